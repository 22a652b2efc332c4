"""I-JEPA masking (Assran et al. 2023, Sec. 3): context and target patch indices for a batch.

`MaskSampler(cfg, grid, seed).sample(batch_size, step)` returns

* ``masks_enc``  LongTensor (B, Kc): sorted patch indices (row-major, ``r * W + c``) of the context;
* ``masks_pred`` LongTensor (B, M, Kt): sorted patch indices of each of the M target blocks.

Reproducibility: every call builds a fresh ``numpy.random.default_rng([seed, step])``; nothing depends on
process-local state (no counters, no global RNG), so a DataLoader or Ray worker that samples the same
``(seed, step)`` gets the same masks.

A sampler, not a collate function: the masks depend on the step, which a DataLoader does not pass to its
collate_fn. The pretraining's collate function, `pipeline.batches.StepCollate`, learns the step from its
batch sampler and calls ``sample(global_batch, step)``; pictures, diagnostics and benchmarks call ``sample``.

Equal lengths without positional bias: masks in a batch differ in size, but a tensor needs one length.
The official code keeps the *first* k indices of each mask, which biases what survives toward the top-left.
Here each mask keeps a uniformly random subset of size k (one sort of packed random keys), then sorts it.
``Kc`` is the minimum context size over the batch; ``Kt`` is the minimum over the batch *and* the M blocks
(one length for the whole (B, M, Kt) tensor). For ``multiblock`` every target block of a batch has the
same shape, so ``Kt = h * w`` and nothing of a target is dropped.

Strategies (``cfg.strategy``):

* ``multiblock`` (the paper's): per BATCH, one target block shape (scale ~ U(pred_scale), aspect ~
  U(pred_aspect)) and one context block shape (scale ~ U(enc_scale), aspect ~ U(enc_aspect)), as the official
  collator draws them; per image, M = ``num_targets`` target blocks and one context block of those shapes at
  independent positions; the context is the context block minus every target patch (unless
  ``allow_overlap``). Drawing a shape per block instead and truncating every block to the batch's smallest
  (this code until 2026-12) returned 25.6 target patches per block where the paper's scale 0.15-0.2 of a
  14x14 grid means 34.3: the targets were ~25 % too small. Block sizes are
  ``h = round(sqrt(scale*N*aspect))``, ``w = round(sqrt(scale*N/aspect))`` clipped to the grid; the top-left
  corner is uniform on ``0..H-h`` and ``0..W-w`` inclusive, so the last row/column can be covered (the
  official ``randint(0, H - h)`` never covers them). Everything is vectorised over the batch.
  If an image's context has fewer than ``min_keep`` patches, all its blocks are placed anew (same shapes),
  vectorised over the failing images only, up to ``MAX_RETRIES`` rounds; images still failing then take the whole
  complement of their targets as context (the context block grows to the full grid); if even that is
  below ``min_keep``, the batch draws new shapes (up to ``MAX_SHAPE_DRAWS`` times: only configs near the
  limit get there, and they lean toward smaller targets), then a ``ValueError`` names the infeasible config.
* ``random``: a uniformly random 60% of the patches is the one target (M = 1), the rest the context.
* ``block``: one square target block of scale 0.6 at a uniformly random position (M = 1); the context is
  its complement.
* ``rasterized``: the grid is split into quadrants at (H // 2, W // 2); one quadrant, uniformly random per
  image, is the context and the other three are the M = 3 target blocks.

``min_keep`` is guaranteed for the multiblock context; the other strategies have fixed sizes and raise
``ValueError`` at construction when their context would be smaller than ``min_keep``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from pipeline.config import MaskConfig

MAX_RETRIES = 20
MAX_SHAPE_DRAWS = 10
RANDOM_TARGET_FRACTION = 0.6
BLOCK_TARGET_SCALE = 0.6


def apply_masks(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Keep the patches named by `masks`: x (B, N, D), masks (B, K) int64 -> (B, K, D), via gather."""
    return torch.gather(x, 1, masks.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def _block_sizes(rng: np.random.Generator, n: int, grid: tuple[int, int], scale: tuple[float, float],
                 aspect: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) of n blocks, each of shape (n,) int64, scale ~ U(scale), aspect ~ U(aspect), clipped to grid."""
    H, W = grid
    u = rng.random((2, n))
    s = (scale[0] + (scale[1] - scale[0]) * u[0]) * (H * W)
    a = aspect[0] + (aspect[1] - aspect[0]) * u[1]
    # np.minimum/np.maximum: the ufuncs directly (np.clip goes through a Python wrapper: ~10 us a call)
    h = np.minimum(np.maximum(np.rint(np.sqrt(s * a)), 1), H).astype(np.int64)
    w = np.minimum(np.maximum(np.rint(np.sqrt(s / a)), 1), W).astype(np.int64)
    return h, w


@lru_cache(maxsize=16)
def _span_tables(grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bool tables rows ((H+1)**2, N) and cols ((W+1)**2, N): entry (start * (H+1) + length) marks the patches
    of grid rows (resp. columns) start..start+length-1. A rectangle is rows[top, h] & cols[left, w]: two row
    gathers and one AND, instead of a broadcast (n, H, 1) & (n, 1, W) that numpy runs 14 bytes at a time."""
    H, W = grid
    r, c = np.divmod(np.arange(H * W), W)

    def spans(pos: np.ndarray, size: int) -> np.ndarray:
        start, length = np.arange(size + 1)[:, None, None], np.arange(size + 1)[None, :, None]
        return ((pos >= start) & (pos < start + length)).reshape((size + 1) ** 2, H * W)

    return spans(r, H), spans(c, W)


def _place(rng: np.random.Generator, h: np.ndarray, w: np.ndarray,
           grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rectangles of sizes (h, w), shapes (n,), with the top-left uniform on 0..H-h, 0..W-w inclusive.

    Returns (mask bool (n, H*W), top (n,), left (n,)).
    """
    H, W = grid
    u = rng.random((2, len(h)))
    top = (u[0] * (H - h + 1)).astype(np.int64)
    left = (u[1] * (W - w + 1)).astype(np.int64)
    rows, cols = _span_tables(grid)
    return rows[top * (H + 1) + h] & cols[left * (W + 1) + w], top, left


def _sorted_keys(rng: np.random.Generator, valid: np.ndarray) -> tuple[np.ndarray, np.unsignedinteger]:
    """Bool (R, C) -> (keys (R, C) sorted per row, low-bit mask): each row's valid columns in a uniformly
    random order, then its invalid ones; ``keys & low`` is the column index.

    One sort of packed unsigned keys instead of an argsort of float keys: raw generator bits above, the
    column index in the low ``bits`` bits, and the top bit set for invalid columns so they sort last. uint32
    keys carry >= 20 random bits when C <= 2048 (a tie, which falls back to column order, hits a 14x14 row
    about once in 400 rows and only matters at the cut); wider rows (up to 2**23 columns) get uint64 keys with >= 40.
    """
    R, C = valid.shape
    bits = max(1, (C - 1).bit_length())
    narrow = bits <= 11
    raw = rng.bit_generator.random_raw((R * C + 1) // 2 if narrow else R * C)
    keys = (raw.view(np.uint32)[:R * C] if narrow else raw).reshape(R, C)
    t = keys.dtype.type
    low = t((1 << bits) - 1)
    keys >>= t(1)
    keys &= ~low
    keys |= np.arange(C, dtype=keys.dtype)
    keys |= (~valid).astype(keys.dtype) << t(keys.dtype.itemsize * 8 - 1)
    keys.sort(axis=1)
    return keys, low


def _random_order(rng: np.random.Generator, valid: np.ndarray) -> np.ndarray:
    """Per row, the valid column indices in a uniformly random order: bool (R, C) -> int64 (R, C).

    Row r's first ``valid[r].sum()`` entries are its valid columns, shuffled; the entries after them are
    meaningless.
    """
    keys, low = _sorted_keys(rng, valid)
    return (keys & low).astype(np.int64)


def _random_subset(rng: np.random.Generator, valid: np.ndarray, k: int) -> np.ndarray:
    """Bool (R, C), every row with >= k valid columns -> (R, k) unsigned: a uniformly random subset of each
    row's valid columns, sorted."""
    keys, low = _sorted_keys(rng, valid)
    idx = keys[:, :k] & low
    idx.sort(axis=1)
    return idx


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """Bool (R, C) -> true entries per row; summing an int8 view into int32 is 2x faster than bool.sum."""
    return mask.view(np.int8).sum(1, dtype=np.int32)


def _equal_subset(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Boolean (R, N) -> int64 (R, k), k = min row count: a uniformly random sorted subset of each row."""
    return _random_subset(rng, mask, int(_row_counts(mask).min())).astype(np.int64)


def _block_subset(rng: np.random.Generator, top: np.ndarray, left: np.ndarray, h: np.ndarray, w: np.ndarray,
                  W: int) -> np.ndarray:
    """Rectangles (all shapes (R,)) -> int64 (R, k), k = min h*w: a uniformly random sorted subset of each.

    Works on ranks within each rectangle (row-major, 0..h*w-1), so the random keys cover only the block,
    not the whole grid; sorted ranks map to sorted patch indices.
    """
    count = h * w
    k, cmax = int(count.min()), int(count.max())
    if k == cmax:
        rank = np.broadcast_to(np.arange(k), (len(h), k))
    else:
        rank = _random_subset(rng, np.arange(cmax) < count[:, None], k)
    # Patch (top + rank // w) * W + left + rank % w, rewritten as top * W + left + (rank // w) * (W - w) + rank
    # and computed in float32, where every value here is an exact integer; rank // w is
    # floor((rank + 0.5) / w), whose fractional part stays >= 0.5 / w away from an integer.
    f = np.float32
    rank = rank.astype(f)
    row = np.floor((rank + f(0.5)) * (f(1) / w.astype(f))[:, None])
    idx = row * (W - w).astype(f)[:, None] + (rank + (top * W + left).astype(f)[:, None])
    return idx.astype(np.int64)


class MaskSampler:
    """Samples I-JEPA context/target masks for a (H, W) patch grid; see the module docstring."""

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int], seed: int = 0):
        self.cfg = cfg
        self.grid = (int(grid[0]), int(grid[1]))
        self.seed = int(seed)
        H, W = self.grid
        if H < 1 or W < 1:
            raise ValueError(f"grid {grid} must be at least 1x1")
        self.num_patches = H * W
        n = self.num_patches
        if cfg.strategy == "random":
            self.num_blocks, context = 1, n - int(round(RANDOM_TARGET_FRACTION * n))
        elif cfg.strategy == "block":
            side = self._square_side(BLOCK_TARGET_SCALE)
            self.num_blocks, context = 1, n - side[0] * side[1]
        elif cfg.strategy == "rasterized":
            if H < 2 or W < 2:
                raise ValueError(f"rasterized masking needs a grid of at least 2x2, got {grid}")
            self.num_blocks, context = 3, (H // 2) * (W // 2)
        else:
            self.num_blocks, context = cfg.num_targets, n
        if context < cfg.min_keep:
            raise ValueError(f"mask.strategy {cfg.strategy} on a {H}x{W} grid keeps {context} context patches, "
                             f"fewer than mask.min_keep = {cfg.min_keep}")

    def _square_side(self, scale: float) -> tuple[int, int]:
        H, W = self.grid
        side = np.sqrt(scale * H * W)
        return int(np.clip(np.rint(side), 1, H)), int(np.clip(np.rint(side), 1, W))

    # ------------------------------------------------------------------------------------------ sampling

    def _sample(self, rng: np.random.Generator, B: int) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        """Context bool (B, N), targets bool (B, M, N), and for rectangular targets their
        (top, left, h, w), each (B * M,), else None."""
        strategy, (H, W), N = self.cfg.strategy, self.grid, self.num_patches
        if strategy == "multiblock":
            return self._multiblock(rng, B)
        if strategy == "random":
            t = int(round(RANDOM_TARGET_FRACTION * N))
            order = _random_order(rng, np.ones((B, N), bool))
            pred = np.zeros((B, N), bool)
            np.put_along_axis(pred, order[:, :t], True, axis=1)
            return ~pred, pred[:, None], None
        if strategy == "block":
            h, w = (np.full(B, v, np.int64) for v in self._square_side(BLOCK_TARGET_SCALE))
            pred, top, left = _place(rng, h, w, self.grid)
            return ~pred, pred[:, None], (top, left, h, w)
        # rasterized
        r, c = np.arange(H) >= H // 2, np.arange(W) >= W // 2
        quadrant = (r[:, None].astype(np.int64) * 2 + c[None, :]).reshape(N)  # 0 TL, 1 TR, 2 BL, 3 BR
        ctx_q = rng.integers(0, 4, B)
        enc = quadrant[None, :] == ctx_q[:, None]
        others = np.array([[q for q in range(4) if q != k] for k in range(4)])[ctx_q]  # (B, 3)
        pred = quadrant[None, None, :] == others[:, :, None]
        return enc, pred, None

    def _multiblock(self, rng: np.random.Generator, B: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        cfg = self.cfg
        for _ in range(MAX_SHAPE_DRAWS):
            ph, pw = _block_sizes(rng, 1, self.grid, cfg.pred_scale, cfg.pred_aspect)  # one shape per batch
            eh, ew = _block_sizes(rng, 1, self.grid, cfg.enc_scale, cfg.enc_aspect)
            out = self._multiblock_placed(rng, B, int(ph[0]), int(pw[0]), int(eh[0]), int(ew[0]))
            if out is not None:
                return out
        raise ValueError(f"mask config {cfg} on grid {self.grid} cannot keep mask.min_keep = "
                         f"{cfg.min_keep} context patches")

    def _multiblock_placed(self, rng: np.random.Generator, B: int, ph: int, pw: int, eh: int,
                           ew: int) -> tuple[np.ndarray, np.ndarray, tuple] | None:
        """Blocks of the batch's shapes at positions per image, or None if some image cannot keep min_keep
        context patches even with the whole complement of its targets (the caller draws new shapes)."""
        cfg, M, N = self.cfg, self.num_blocks, self.num_patches
        enc = np.zeros((B, N), bool)
        pred = np.zeros((B, M, N), bool)
        geom = np.zeros((4, B, M), np.int64)  # top, left, h, w
        todo = np.arange(B)
        for _ in range(MAX_RETRIES + 1):
            n = len(todo)
            h, w = np.full(n * M, ph, np.int64), np.full(n * M, pw, np.int64)
            p, top, left = _place(rng, h, w, self.grid)
            p = p.reshape(n, M, N)
            e = _place(rng, np.full(n, eh, np.int64), np.full(n, ew, np.int64), self.grid)[0]
            if not cfg.allow_overlap:
                e &= ~p.any(1)
            if n == B:  # the common first round: no scatter
                pred, enc, geom = p, e, np.stack([top, left, h, w]).reshape(4, B, M)
            else:
                pred[todo], enc[todo] = p, e
                geom[:, todo] = np.stack([top, left, h, w]).reshape(4, n, M)
            todo = todo[_row_counts(e) < cfg.min_keep]
            if len(todo) == 0:
                break
        else:  # fallback: the whole complement of the targets as context
            enc[todo] = ~pred[todo].any(1) if not cfg.allow_overlap else True
            if (enc[todo].sum(1) < cfg.min_keep).any():
                return None
        return enc, pred, tuple(geom.reshape(4, B * M))

    # ------------------------------------------------------------------------------------------ public

    def sample_boolean(self, batch_size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The full masks before equal-length subsetting: context bool (B, N), targets bool (B, M, N).

        Same draws as `sample(batch_size, step)` (which subsets them afterwards).
        """
        enc, pred, _ = self._sample(np.random.default_rng([self.seed, int(step)]), batch_size)
        return enc, pred

    def sample(self, batch_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """masks_enc LongTensor (B, Kc) and masks_pred LongTensor (B, M, Kt); a function of (seed, step)."""
        rng = np.random.default_rng([self.seed, int(step)])
        enc, pred, geom = self._sample(rng, batch_size)
        B, M, N = pred.shape
        masks_enc = _equal_subset(rng, enc)
        if geom is not None:
            masks_pred = _block_subset(rng, *geom, W=self.grid[1])
        else:
            masks_pred = _equal_subset(rng, pred.reshape(B * M, N))
        return torch.from_numpy(masks_enc), torch.from_numpy(np.ascontiguousarray(masks_pred.reshape(B, M, -1)))

"""Stage `prepare`: generate the embedded scenes in the real formats, or validate the real datasets.

synthetic: render data.synthetic scenes and write <data.root>/{imagenet,clevr,nyu}/ + manifest.json
(everything built in a temporary folder and renamed into place at the end).
real: check the configured ImageNet / CLEVR / NYU layouts (every ImageNet image decoded; corrupt
ones skipped and counted, or an error with data.on_corrupt: fail) and write <data.root>/manifest.json.
"""

from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.data.export import export_synthetic
from pipeline.data.manifest import validate_real, write_manifest


def main(cfg: Config) -> None:
    root = Path(cfg.data.root)
    if cfg.data.source == "synthetic":
        manifest = export_synthetic(cfg.data, root)
    else:
        manifest = validate_real(cfg.data)
        write_manifest(manifest, root / "manifest.json")
    im = manifest["imagenet"]
    print(f"prepare ok ({cfg.data.source}): imagenet {im['train']['count']} train / {im['val']['count']} val "
          f"images in {im['num_classes']} classes, {im['subset']['count']} in the 1% list, "
          f"{im['num_corrupt']} corrupt skipped; clevr {'yes' if manifest['clevr'] else 'not configured'}, "
          f"nyu {'yes' if manifest['nyu'] else 'not configured'} -> {root / 'manifest.json'}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])

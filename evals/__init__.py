"""Downstream evaluations of a frozen encoder: linear probe, 1% probe, CLEVR, NYU depth, and the report.

Each `evaluate_*(encoder, datasets..., cfg)` takes a built encoder and returns a dict of figures; each
module's `run(cfg, root)` is what its DVC stage calls: it loads the pretrained encoder, scores it and a
random-init twin, writes `metrics/<stage>.json` and logs a child run of the pretrain MLflow run.
"""

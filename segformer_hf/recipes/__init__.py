"""Training recipes that ship with segformer_hf (found by name: `--config demo`), their label files, and the
bundled demo data (camvid-demo/, a small attributed CamVid subset; see its LICENSE.md)."""

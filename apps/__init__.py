"""Applications that compose the layers (shards <- pipeline <- model): `python -m apps.predict` (labels for video
files), `python -m apps.reconstruct` (what a pretrained model fills in, as a PNG), `python -m apps.demo` (the
end-to-end demo behind `make demo`)."""

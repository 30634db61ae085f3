"""Data curation: `fluxion curate RECIPE.toml` (pipeline.py: plan -> per-image stages -> dedup -> shards + manifest
+ report), its stages (stages.py: decode, quality, hashes, text; models.py: watermark, score heads, captions;
download.py: URL lists), dedup.py (LSH over pHash/PDQ), report.py (the HTML page), watermark.py (our classifier
and its synthetic training data). `tinyset/` builds fluxion-tiny's synthetic training set."""

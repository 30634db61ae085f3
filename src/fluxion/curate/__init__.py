"""Data curation. `tinyset/` builds fluxion-tiny's synthetic training set."""

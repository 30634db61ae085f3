"""fluxion: a from-scratch FLUX.2 stack (generate, edit, train)."""

__version__ = "0.1.0"

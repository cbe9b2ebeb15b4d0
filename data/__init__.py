"""Corpus sources: Debian-packaged texts (`data.recipes`) and synthetic documents (`data.synthetic`)."""

"""Data: corpus readers and recipes, tokenizer, MinHash dedupe, split, artefact formats, epoch replay, tasks."""

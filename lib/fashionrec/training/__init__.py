"""Fine-tuning on the catalog's own categories: heads, last blocks, the category classifier."""

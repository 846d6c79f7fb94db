"""One experiment end to end: prepare, embed, evaluate frozen or fine-tuned backbones."""

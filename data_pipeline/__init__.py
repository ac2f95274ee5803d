"""Sources, tokenizers, token shards and the training loader."""

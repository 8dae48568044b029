"""pgolf data: FineWeb download, tokenizer training and shards, the offline builtin corpus."""

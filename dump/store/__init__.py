"""The label store: its schema, its writing, its reader, and the checks that it fits its shards."""

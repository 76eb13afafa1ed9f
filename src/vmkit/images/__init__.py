"""Guest images: the catalog (images/<name>/image.json) and the builders that make them."""

"""TFLite files as data: what a file offers (describe) and faster rewrites (bytes in, bytes out)."""

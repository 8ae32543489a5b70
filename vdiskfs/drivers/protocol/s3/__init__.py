"""Protocol driver ``s3``."""

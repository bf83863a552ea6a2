"""Code shared by the API and the workers: settings, job records, image decoding (no torch)."""

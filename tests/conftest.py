import os

# albumentations phones home for a newer version on import; tests run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

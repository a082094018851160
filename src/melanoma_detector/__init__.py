"""melanoma-detector: benign vs. malignant (melanoma) classification of dermoscopic images.

Research software. Never a diagnosis.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Research software, not a medical device: this output is not a diagnosis. "
    "Any lesion of concern must be examined by a qualified clinician."
)
CLASS_NAMES = ("benign", "malignant")

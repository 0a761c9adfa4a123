"""The fixed class order every model, CSV and plot in the project uses.

HAM10000 `dx` codes in alphabetical order. Label index ``i`` always means ``CLASSES[i]``; the ISIC 2018
one-hot columns are mapped onto this order by name (see ``ISIC_COLUMNS``), never by position.
"""

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NUM_CLASSES = len(CLASSES)
CLASS_TO_INDEX = {name: i for i, name in enumerate(CLASSES)}

# ISIC 2018 Task 3 ground-truth column -> HAM10000 dx code.
ISIC_COLUMNS = {
    "MEL": "mel",
    "NV": "nv",
    "BCC": "bcc",
    "AKIEC": "akiec",
    "BKL": "bkl",
    "DF": "df",
    "VASC": "vasc",
}

# Long names for reports and plots.
CLASS_DESCRIPTIONS = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

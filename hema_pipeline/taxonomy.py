"""The cell classes the pipeline knows, shared by every stage.

Import labels (analyser pre-classification and technologist-verified class) must be one of
``CELL_CLASSES``; anything else is quarantined at import. Clinical tasks (``datasets.tasks``) map these
labels onto the classes one model learns.
"""

from __future__ import annotations

from typing import Final

NEUTROPHIL: Final = "neutrophil"
HYPOGRANULATED_NEUTROPHIL: Final = "hypogranulated_neutrophil"
EOSINOPHIL: Final = "eosinophil"
BASOPHIL: Final = "basophil"
LYMPHOCYTE: Final = "lymphocyte"
MALIGNANT_LYMPHOCYTE: Final = "malignant_lymphocyte"
MONOCYTE: Final = "monocyte"
IMMATURE_GRANULOCYTE: Final = "immature_granulocyte"
ERYTHROBLAST: Final = "erythroblast"
PLATELET: Final = "platelet"

CELL_CLASSES: Final[tuple[str, ...]] = (
    NEUTROPHIL,
    HYPOGRANULATED_NEUTROPHIL,
    EOSINOPHIL,
    BASOPHIL,
    LYMPHOCYTE,
    MALIGNANT_LYMPHOCYTE,
    MONOCYTE,
    IMMATURE_GRANULOCYTE,
    ERYTHROBLAST,
    PLATELET,
)

# The eight classes of the PBC set (Acevedo et al. 2020) in its folder names.
PBC_FOLDER_TO_CLASS: Final[dict[str, str]] = {
    "neutrophil": NEUTROPHIL,
    "eosinophil": EOSINOPHIL,
    "basophil": BASOPHIL,
    "lymphocyte": LYMPHOCYTE,
    "monocyte": MONOCYTE,
    "ig": IMMATURE_GRANULOCYTE,
    "erythroblast": ERYTHROBLAST,
    "platelet": PLATELET,
}


def is_known_class(label: str) -> bool:
    return label in CELL_CLASSES

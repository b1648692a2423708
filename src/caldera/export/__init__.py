"""Models out of Python: ``caldera export`` writes a run's model in physical units as safetensors, TorchScript,
torch.export / AOTInductor and ONNX artefacts, verifies each against the eager model and describes them in a card.
"""

from caldera.export.formats import FORMATS as FORMATS
from caldera.export.physical import PhysicalModel as PhysicalModel
from caldera.export.runner import Result as Result
from caldera.export.runner import export as export

"""sparsevd: Sparse Variational Dropout for PyTorch.

Swap ``nn.Linear`` for :class:`SparseVDLinear`, add ``kl_weight · kl_divergence(model) / N``
to the loss (:class:`SGVLBLoss` does it), and the network prunes itself.
"""

from . import dispatch, functional, reference  # noqa: F401  (importing them registers the ops)
from .attention import SparseVDMultiheadAttention, SparseVDTransformerEncoderLayer
from .conv import SparseVDConv1d, SparseVDConv2d
from .convert import ConversionReport, convert
from .embedding import SparseEmbedding, SparseVDEmbedding
from .inference import FusedSequential
from .layers import SparseVDLinear, SparseVDModule
from .report import Report, report
from .sbp import SBPDropout, sbp_modules
from .sparse import SparseConv1d, SparseConv2d, SparseLinear
from .sparse_attention import SparseMultiheadAttention
from .sparse_transformer import SparseTransformerEncoderLayer
from .patch_conv import PatchConv2d
from .sparsify import CostModel, sparsify
from .uncertainty import Prediction, predict
from .pruning_layers import sparsevd_modules
from .training import KLWarmup, SGVLBLoss, compression, freeze_masks, kl_divergence, sgvlb, unfreeze_masks
from .likelihoods import GaussianLikelihood
from .training import CollapseWarning

__version__ = "0.1.0"

__all__ = [
    "SBPDropout",
    "sbp_modules",
    "SparseVDLinear",
    "SparseVDConv2d",
    "SparseVDConv1d",
    "SparseConv2d",
    "SparseConv1d",
    "convert",
    "ConversionReport",
    "SparseVDMultiheadAttention",
    "SparseVDTransformerEncoderLayer",
    "SparseVDEmbedding",
    "SparseEmbedding",
    "SparseMultiheadAttention",
    "SparseTransformerEncoderLayer",
    "PatchConv2d",
    "predict",
    "Prediction",
    "SparseLinear",
    "FusedSequential",
    "sparsify",
    "CostModel",
    "report",
    "Report",
    "SparseVDModule",
    "KLWarmup",
    "SGVLBLoss",
    "compression",
    "freeze_masks",
    "unfreeze_masks",
    "kl_divergence",
    "sgvlb",
    "sparsevd_modules",
    "functional",
    "reference",
    "dispatch",
    "GaussianLikelihood",
    "CollapseWarning",
]

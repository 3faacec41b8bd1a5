"""rednet: RedNet image classifiers (Li et al., CVPR 2021) with fast involution kernels.

``import rednet`` registers rednet26/38/50/101/152 with timm.
"""
from .ops import involution
from .model import DEPTHS, Bottleneck, Involution, RedNet
from .checkpoint import load_model

__version__ = '0.1.0'
__all__ = ['involution', 'Involution', 'Bottleneck', 'RedNet', 'DEPTHS', 'load_model']

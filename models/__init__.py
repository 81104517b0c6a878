"""Model zoo: every model in its own file with a typed config, registered here by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.base import ModelInputs, Recommender
from models.bpr_mf import BPRMF, BPRMFConfig
from models.config import build_config
from models.freedom import FREEDOM, FREEDOMConfig
from models.lattice import LATTICE, LATTICEConfig
from models.lightgcn import LightGCN, LightGCNConfig
from models.mario import MARIO, MARIOConfig
from models.mcln import MCLN, MCLNConfig
from models.mkgat import MKGAT, MKGATConfig
from models.mmgcl import MMGCL, MMGCLConfig
from models.mmgcn import MMGCN, MMGCNConfig
from models.mmmlp import MMMLP, MMMLPConfig
from models.mp4sr import MP4SR, MP4SRConfig
from models.pamd import PAMD, PAMDConfig
from models.popularity import Popularity, PopularityConfig
from models.promptmm import PromptMM, PromptMMConfig
from models.qarm import QARM, QARMConfig
from models.r2mr import R2MR, R2MRConfig
from models.sasrec import SASRec, SASRecConfig
from models.tmfun import TMFUN, TMFUNConfig
from models.vbpr import VBPR, VBPRConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_class: type[Any]
    model_class: type[Recommender]
    needs_modalities: bool = False
    needs_knowledge_graph: bool = False  # model_inputs joins the dataset's KG (training/data/knowledge_graph.py)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("popularity", PopularityConfig, Popularity),
        ModelSpec("bpr", BPRMFConfig, BPRMF),
        ModelSpec("lightgcn", LightGCNConfig, LightGCN),
        ModelSpec("vbpr", VBPRConfig, VBPR, needs_modalities=True),
        ModelSpec("sasrec", SASRecConfig, SASRec),
        ModelSpec("mp4sr", MP4SRConfig, MP4SR, needs_modalities=True),
        ModelSpec("mmmlp", MMMLPConfig, MMMLP, needs_modalities=True),
        ModelSpec("qarm", QARMConfig, QARM, needs_modalities=True),
        ModelSpec("mmgcn", MMGCNConfig, MMGCN, needs_modalities=True),
        ModelSpec("lattice", LATTICEConfig, LATTICE, needs_modalities=True),
        ModelSpec("freedom", FREEDOMConfig, FREEDOM, needs_modalities=True),
        ModelSpec("r2mr", R2MRConfig, R2MR, needs_modalities=True),
        ModelSpec("mmgcl", MMGCLConfig, MMGCL, needs_modalities=True),
        ModelSpec("mario", MARIOConfig, MARIO, needs_modalities=True),
        ModelSpec("promptmm", PromptMMConfig, PromptMM, needs_modalities=True),
        ModelSpec("mkgat", MKGATConfig, MKGAT, needs_modalities=True, needs_knowledge_graph=True),
        ModelSpec("mcln", MCLNConfig, MCLN, needs_modalities=True),
        ModelSpec("tmfun", TMFUNConfig, TMFUN, needs_modalities=True),
        ModelSpec("pamd", PAMDConfig, PAMD, needs_modalities=True),
    ]
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, inputs: ModelInputs, *config_layers: Mapping[str, Any]) -> Recommender:
    spec = model_spec(name)
    config = build_config(spec.config_class, *config_layers)
    return spec.model_class(config, inputs)

"""The serving side: load an artifact into a diffusers pipeline, compiled components behind input guards, CUDA
graphs, stand-ins, regional loading, replicas and weight swaps, and the ``diffbake verify`` child. Imports nothing
from the build side: a production host needs torch, diffusers, safetensors and the artifact, not a compiler."""

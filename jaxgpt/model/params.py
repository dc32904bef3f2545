"""A GPT's parameters as a flat ``{"h.0.attn.c_attn.kernel": array}`` dict, and back.

Training, checkpoints and the converter all work on this flat dict: plain string
keys read well in checkpoints and error messages, and optax and Orbax take any
dict. :class:`ParamCodec` remembers the model's graph so the dict can be merged
back into a :class:`~jaxgpt.model.GPT` (also inside ``jax.jit``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxgpt.core.sharding import state_shardings
from jaxgpt.model.config import GPTConfig
from jaxgpt.model.gpt import GPT

Params = dict[str, jax.Array]


def _path_name(path: tuple) -> str:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    assert None not in keys, path
    return ".".join(str(k) for k in keys)


class ParamCodec:
    """Converts between a GPT of one config and its flat parameter dict."""

    def __init__(self, config: GPTConfig):
        self.config = config
        abstract = nnx.eval_shape(lambda: GPT(config, nnx.Rngs(0)))  # shapes only: nothing is initialised
        self.graphdef, self._state = nnx.split(abstract)
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(self._state)
        self.names = [_path_name(path) for path, _ in leaves]
        self.abstract: dict[str, jax.ShapeDtypeStruct] = {
            name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            for name, (_, leaf) in zip(self.names, leaves, strict=True)
        }
        assert len(set(self.names)) == len(self.names), "parameter names must be unique"

    def to_flat(self, model: GPT) -> Params:
        """The model's parameters as a flat ``{name: array}`` dict, the form checkpoints store."""
        leaves = jax.tree.leaves(nnx.state(model))
        assert len(leaves) == len(self.names), (len(leaves), len(self.names))
        return dict(zip(self.names, leaves, strict=True))

    def to_host(self, model: GPT) -> dict[str, np.ndarray]:
        """The parameters as numpy arrays in host memory (to convert, export or re-place them)."""
        return {name: np.asarray(value) for name, value in self.to_flat(model).items()}

    def cast(self, params: dict[str, np.ndarray | jax.Array]) -> Params:
        """``params`` in this config's param_dtype, as the model would hold them."""
        assert set(params) == set(self.names), set(params) ^ set(self.names)
        return {name: jax.numpy.asarray(params[name], self.abstract[name].dtype) for name in self.names}

    def abstract_model(self) -> GPT:
        """The model of shapes only (``jax.ShapeDtypeStruct`` leaves): to count or inspect, not to run."""
        return self.to_model(self.abstract)

    def to_model(self, params: Params) -> GPT:
        """A GPT whose parameters are ``params`` (as ``to_flat`` gives them), without copying them."""
        missing = set(self.names) - params.keys()
        assert not missing, f"missing parameters: {sorted(missing)[:5]}"
        state = jax.tree.unflatten(self._treedef, [params[name] for name in self.names])
        return nnx.merge(self.graphdef, state)

    def shardings(self, mesh: Mesh, fsdp: bool = False) -> dict[str, NamedSharding]:
        """Each parameter's NamedSharding, from the logical axes recorded on its Variable."""
        tree = state_shardings(self._state, mesh, fsdp)
        return dict(zip(self.names, jax.tree.leaves(tree), strict=True))

    def init(self, seed: int, shardings: dict[str, NamedSharding] | None = None) -> Params:
        """GPT-2-initialised parameters, created directly in their shards (never whole on one device)."""

        def init_fn(key: jax.Array) -> Params:
            return self.to_flat(GPT(self.config, nnx.Rngs(params=key)))

        return jax.jit(init_fn, out_shardings=shardings)(jax.random.key(seed))

"""The single-query model: uint8 pixels in, embedding out, in one ONNX Runtime call.

:func:`uint8_query_model` takes the ONNX file a backbone's batch path runs (fp32 or int8) and
puts the tensor half of its preprocessing in front of it, as graph nodes: the (N, H, W, 3)
uint8 crop is cast to float, transposed to NCHW, divided by 255 (``ToTensor``), then the mean
is subtracted and the result divided by the std (``Normalize``) — the very operations, in the
very order, that torchvision applies, so the network receives the same numbers. The network
nodes are untouched. A query then needs no torch at all: decode, :func:`crop_pixels` (exact
Pillow geometry), one ``session.run``.

:class:`OnnxEncoder` runs it on one photo, stage by stage (crop, network), timing each.

Session settings for one image at a time (:func:`query_session`): every CPU as an intra-op
thread, and spinning chosen for the machine (:func:`spinning_suits_this_machine`). Spinning
threads wait for the next operator without sleeping, which saves a wake-up per operator on
cores nobody else needs, and is ruinous on cores other processes want (measured here on a
2-core machine at load average 5: the network took twice as long spinning). Either way they
stop spinning when a run ends, so they do not take the cores the next query decodes on.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import FashionRecError
from ..settings import available_threads
from .preprocess import Preprocessing, crop_pixels, geometry_is_exact

# The input and output names of every network the workbench exports to ONNX.
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
PIXELS_INPUT = "pixels"


def uint8_query_model(source, target, spec: Preprocessing) -> Path:
    """Writes ``target``: the ONNX model ``source`` with ``spec``'s ToTensor/Normalize in front.

    Input ``pixels``: uint8 (batch, height, width, 3), the crop as :func:`crop_pixels` makes
    it; output ``embeddings`` as in ``source``. Written to a temporary name, then renamed.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    inputs = [item for item in graph.input if item.name == INPUT_NAME]
    if len(inputs) != 1:
        raise FashionRecError(f"{source}: expected one input named {INPUT_NAME!r}")
    height, width = spec.input_size
    nodes, initializers = [], []
    current = PIXELS_INPUT
    # Transposing the uint8 pixels before the cast moves a quarter of the bytes; both are exact.
    steps = [("Transpose", {"perm": [0, 3, 1, 2]}, []), ("Cast", {"to": TensorProto.FLOAT}, [])]
    if spec.scale:
        steps.append(("Div", {}, [np.array(255.0, np.float32)]))
    if spec.mean is not None:
        steps.append(("Sub", {}, [_per_channel(spec.mean)]))
        steps.append(("Div", {}, [_per_channel(spec.std)]))
    for position, (op, attributes, constants) in enumerate(steps):
        output = INPUT_NAME if position == len(steps) - 1 else f"query_preprocess_{position}"
        constant_names = []
        for constant in constants:
            name = f"query_preprocess_constant_{position}"
            initializers.append(numpy_helper.from_array(constant, name))
            constant_names.append(name)
        nodes.append(helper.make_node(op, [current, *constant_names], [output],
                                      name=f"query_preprocess_{op}_{position}", **attributes))
        current = output
    graph.input.remove(inputs[0])
    graph.input.insert(0, helper.make_tensor_value_info(PIXELS_INPUT, TensorProto.UINT8, ["batch", height, width, 3]))
    graph.initializer.extend(initializers)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-", suffix=".onnx")
    os.close(handle)
    try:
        onnx.save(model, temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _per_channel(values) -> np.ndarray:
    """Per-channel constants as a (1, C, 1, 1) tensor, or as one scalar when every channel has the same value.

    The same numbers either way. But ONNX Runtime runs an int8 model's first operators in NHWC
    (its layout optimisation moves our transpose past them), where it broadcasts a scalar fast and
    a last axis of 3 slowly: measured on EfficientNet-Lite0 int8 (mean and std equal across
    channels), 4.8 -> 3.6 ms per query, identical outputs.
    """
    array = np.array(values, np.float32)
    if np.all(array == array[0]):
        return np.array(array[0], np.float32)
    return array.reshape(1, -1, 1, 1)


# Spin only while the machine's run queue is at most this share of its CPUs.
SPINNING_MAX_LOAD_PER_CPU = 0.5


def spinning_suits_this_machine() -> bool:
    """Whether the 1-minute load average leaves the CPUs idle enough for spinning threads."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):   # no load average on this platform: do not gamble
        return False
    return load <= SPINNING_MAX_LOAD_PER_CPU * available_threads()


def query_session(path, threads: int | None = None, spinning: bool = False):
    """An ONNX Runtime session tuned for one image per run (see the module docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_query_model(session, pixels: np.ndarray) -> np.ndarray:
    """Embeddings (batch, dim) float32 for uint8 crops (batch, height, width, 3) or one crop (height, width, 3)."""
    batch = pixels[None] if pixels.ndim == 3 else pixels
    return session.run([OUTPUT_NAME], {PIXELS_INPUT: np.ascontiguousarray(batch, dtype=np.uint8)})[0]


def _milliseconds(start: float, end: float) -> float:
    return (end - start) * 1000.0


class OnnxEncoder:
    """One photo -> one vector: exact Pillow geometry, then the uint8 query model. ``session`` may be shared
    with other views of the photo (:meth:`with_spec`). Safe to call from several threads at once.

    ``compiled``: resize and crop in the compiled kernels (checked against Pillow once per process,
    :func:`~fashionrec.models.preprocess.geometry_is_exact`), else with Pillow itself: the same pixels.
    """

    path = "onnx-uint8"

    def __init__(self, spec: Preprocessing, session, compiled: bool = True):
        self.spec = spec
        self.session = session
        self.exact_shortcut = compiled and geometry_is_exact(spec)

    @classmethod
    def from_file(cls, model_path: Path, spec: Preprocessing, threads: int | None = None,
                  spinning: bool = False, compiled: bool = True) -> "OnnxEncoder":
        return cls(spec, query_session(model_path, threads, spinning), compiled)

    @property
    def draft_size(self) -> int | None:
        return self.spec.draft_size

    def encode(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict]:
        """(vector (1, dim), milliseconds of ``preprocess`` and ``embed``) of a decoded photo."""
        started = time.perf_counter()
        pixels = crop_pixels(image, self.spec, self.exact_shortcut)
        prepared = time.perf_counter()
        vector = run_query_model(self.session, pixels)
        done = time.perf_counter()
        return vector, {"preprocess": _milliseconds(started, prepared), "embed": _milliseconds(prepared, done)}

    def encode_with(self, image_for) -> tuple[np.ndarray, dict]:
        """:meth:`encode` of ``image_for(draft_size)``, the photo decoded at this model's JPEG draft size."""
        return self.encode(image_for(self.draft_size))

    def with_spec(self, spec: Preprocessing) -> "OnnxEncoder":
        """The same network and threads seeing another view of the image."""
        return OnnxEncoder(spec, self.session, self.exact_shortcut)

"""EfficientNet-Lite0 from standard Keras layers, and its ImageNet weights put in place.

Lite0 is EfficientNet-B0 made for mobile runtimes: no squeeze-and-excite, ReLU6, a fixed
32-filter stem and 1280-filter head. The weights come from PyTorch (the layer names below
are that model's), so its conventions are kept: symmetric zero padding before a stride-2
convolution (Keras' "same" pads the bottom-right only: the features drift), batch-norm
epsilon 1e-3, inputs scaled from 0..255 to -1..1 by the model's first layer. Everything is a
plain Keras layer, so model.json loads with model_from_json and no custom objects.
"""

import collections

INPUT_SIZE = 224
FEATURES = 1280
BN_EPSILON = 1e-3
# (expansion, kernel, stride of the first block, output filters, blocks)
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def _plan():
    """The network as steps: ("conv", keras name, torch name, in, out, kernel, stride),
    ("dwconv", …, channels, channels, kernel, stride), ("bn", keras name, torch name,
    channels), ("relu", keras name), ("block", keras name, skip?) marks a residual block's
    start and ("add", keras name) its end."""
    yield "conv", "stem_conv", "_conv_stem", 3, 32, 3, 2
    yield "bn", "stem_bn", "_bn0", 32
    yield "relu", "stem_relu"
    channels, block = 32, 0
    for expansion, kernel, stride, filters, repeats in STAGES:
        for i in range(repeats):
            step = stride if i == 0 else 1
            keras_name, torch_name = f"block{block}_", f"_blocks.{block}."
            skip = step == 1 and channels == filters
            yield "block", keras_name, skip
            wide = channels * expansion
            if expansion != 1:
                yield "conv", keras_name + "expand_conv", torch_name + "_expand_conv", \
                    channels, wide, 1, 1
                yield "bn", keras_name + "expand_bn", torch_name + "_bn0", wide
                yield "relu", keras_name + "expand_relu"
            yield "dwconv", keras_name + "dwconv", torch_name + "_depthwise_conv", wide, wide, \
                kernel, step
            yield "bn", keras_name + "dw_bn", torch_name + "_bn1", wide
            yield "relu", keras_name + "dw_relu"
            yield "conv", keras_name + "project_conv", torch_name + "_project_conv", wide, \
                filters, 1, 1
            yield "bn", keras_name + "project_bn", torch_name + "_bn2", filters
            if skip:
                yield "add", keras_name + "add"
            channels, block = filters, block + 1
    yield "conv", "head_conv", "_conv_head", channels, FEATURES, 1, 1
    yield "bn", "head_bn", "_bn1", FEATURES
    yield "relu", "head_relu"


def tensor_shapes():
    """{torch tensor name: shape} the backbone needs from a state dict (the 1000-class
    classifier and batch-norm counters are not needed)."""
    shapes = collections.OrderedDict()
    for step in _plan():
        if step[0] == "conv":
            _, _, torch_name, cin, cout, kernel, _ = step
            shapes[torch_name + ".weight"] = (cout, cin, kernel, kernel)
        elif step[0] == "dwconv":
            _, _, torch_name, channels, _, kernel, _ = step
            shapes[torch_name + ".weight"] = (channels, 1, kernel, kernel)
        elif step[0] == "bn":
            for part in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{step[2]}.{part}"] = (step[3],)
    return shapes


def mismatch(state):
    """Why `state` (torch name -> array) cannot be this backbone's weights, or None."""
    for name, shape in tensor_shapes().items():
        if name not in state:
            return f"no tensor {name} (not an EfficientNet-Lite0 state dict?)"
        if tuple(state[name].shape) != shape:
            return f"{name} has shape {tuple(state[name].shape)}, EfficientNet-Lite0 needs {shape}"
        if state[name].dtype.kind != "f":
            return f"{name} holds {state[name].dtype}, not floating-point numbers"
    return None


def build():
    """The backbone as a Keras model: RGB 0..255 (INPUT_SIZE, INPUT_SIZE, 3) -> FEATURES
    pooled features; weights not yet set (see assign)."""
    import keras
    from keras import layers

    image = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(image)
    block_input = None
    for step in _plan():
        kind, name = step[0], step[1]
        if kind in ("conv", "dwconv"):
            kernel, stride = step[5], step[6]
            padding = "same"
            if stride == 2:  # torch's symmetric padding
                x = layers.ZeroPadding2D((kernel - 1) // 2, name=name + "_pad")(x)
                padding = "valid"
            if kind == "conv":
                x = layers.Conv2D(step[4], kernel, stride, padding=padding, use_bias=False,
                                  name=name)(x)
            else:
                x = layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False,
                                           name=name)(x)
        elif kind == "bn":
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=name)(x)
        elif kind == "relu":
            x = layers.ReLU(6.0, name=name)(x)
        elif kind == "block":
            block_input = x
        elif kind == "add":
            x = layers.Add(name=name)([block_input, x])
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, features, name="efficientnet_lite0")


def assign(model, state):
    """Put the torch state dict's weights into `build()`'s model (checked by mismatch())."""
    for step in _plan():
        kind, name = step[0], step[1]
        if kind == "conv":  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
            model.get_layer(name).set_weights([state[step[2] + ".weight"].transpose(2, 3, 1, 0)])
        elif kind == "dwconv":  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
            model.get_layer(name).set_weights([state[step[2] + ".weight"].transpose(2, 3, 0, 1)])
        elif kind == "bn":
            model.get_layer(name).set_weights(
                [state[f"{step[2]}.{part}"] for part in
                 ("weight", "bias", "running_mean", "running_var")])

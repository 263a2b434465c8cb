"""Facts about the architectures, without torch: params.py checks ``model.*`` against them
before any stage imports torch, and the model modules build from them."""

ARCH_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Top-level modules of a torchvision ResNet, in forward order.
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                   "avgpool", "fc")
# Crop side: activations grow with its square, 20x those of the report's 224 px at 1,024.
MAX_CROP_SIZE = 1024

import torch
from PIL import Image
from skimage import data

from diffad.backbone import FeatureExtractor, create_classifier
from diffad.data import to_tensor


def test_imagenet_weights_recognise_a_cat():
    image = to_tensor(Image.fromarray(data.chelsea()), 224)
    with torch.no_grad():
        probs = create_classifier()(image[None]).softmax(-1)[0]
    assert probs.argmax().item() == 285  # ImageNet "Egyptian cat"
    assert probs[281:286].sum() > 0.8  # the domestic-cat classes


def test_features_are_stride_8_and_176_channels():
    features = FeatureExtractor()(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, 176, 8, 8)


def test_one_shared_backbone_per_name_however_it_is_asked_for():
    from diffad.backbone import DEFAULT_BACKBONE
    from diffad.detector import shared_backbone

    # Training moves the shared backbone to its device; the detector it calibrates must see that same module.
    assert shared_backbone() is shared_backbone(DEFAULT_BACKBONE)

"""The original's torchvision pipelines, the reference the benchmarks compare the project against.
Both take a PIL RGB image (`Image.open(path).convert('RGB')`, as the original's dataset did)."""
from torchvision import transforms


def train_transform(image_size, mean, std):
    """Resize((r, r)), r = round(8s/7) -> RandomCrop(s) -> RandomHorizontalFlip -> ToTensor -> Normalize:
    PIL RGB -> float32 [3, s, s]."""
    r = int(round(image_size * 8 / 7))
    return transforms.Compose([transforms.Resize((r, r)), transforms.RandomCrop(image_size),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def test_transform(image_size, mean, std):
    """Resize((s, s)) -> ToTensor -> Normalize: PIL RGB -> float32 [3, s, s]."""
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


# not tests, whatever their names: pytest must not collect them where a test file imports them
test_transform.__test__ = False

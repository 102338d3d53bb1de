from __future__ import annotations

import io

import pytest
import torch

from dfkd.generators import ImagePool


def batch(start: int, n: int) -> torch.Tensor:
    """Images whose every pixel holds their index: easy to tell apart after storage."""
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()


def ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].round().long().tolist()


def test_bounded_first_in_first_out():
    pool = ImagePool(10, dtype=torch.float32)
    for k in range(3):
        pool.add(batch(4 * k, 4))
    assert len(pool) == 10 and pool.added == 12
    assert ids(pool.newest(10)) == list(range(2, 12))  # 0 and 1 were evicted
    pool.add(batch(100, 25))  # larger than the pool: only its last 10 stay
    assert ids(pool.newest(10)) == list(range(115, 125))


def test_sample_uniform_distinct_and_paired_with_labels():
    pool = ImagePool(64)
    x = batch(0, 40)
    pool.add(x, labels=x[:, 0, 0, :2].clone())  # soft label = the image's own index, twice
    torch.manual_seed(0)
    imgs, labels = pool.sample(32)
    assert imgs.dtype == torch.float32 and imgs.shape == (32, 1, 4, 4)
    assert len(set(ids(imgs))) == 32, "a minibatch no larger than the pool has no repeats"
    assert torch.equal(labels[:, 0], imgs[:, 0, 0, 0])
    counts = torch.zeros(40)
    for _ in range(200):
        counts += torch.bincount(torch.tensor(ids(pool.sample(10)[0])), minlength=40)
    assert counts.min() > 20 and counts.max() < 80, "every image is drawn about 50 times in 2000 draws"
    big, _ = pool.sample(100)  # more than the pool holds: drawn with replacement
    assert big.shape[0] == 100 and set(ids(big)) <= set(range(40))


def test_float16_storage_is_what_comes_back():
    pool = ImagePool(8)
    x = torch.randn(8, 1, 4, 4)
    pool.add(x)
    assert torch.equal(pool.newest(8), x.half().float())


def test_errors_are_clear():
    pool = ImagePool(8)
    with pytest.raises(RuntimeError, match="empty"):
        pool.sample(2)
    pool.add(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="holds"):
        pool.add(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        pool.add(torch.zeros(2, 1, 4, 4), labels=torch.zeros(2, 10))
    with pytest.raises(ValueError):
        ImagePool(0)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("on_disk", [False, True])
def test_state_round_trip_loses_nothing(tmp_path, on_disk):
    pool = ImagePool(12, root=tmp_path / "pool" if on_disk else None)
    for _ in range(4):
        pool.add(torch.randn(5, 1, 4, 4), labels=torch.randn(5, 3))
    other = ImagePool(1, root=tmp_path / "pool" if on_disk else None)
    other.load_state_dict(roundtrip(pool.state_dict()))
    assert (len(other), other.next, other.added, other.capacity) == (len(pool), pool.next, pool.added, 12)
    torch.manual_seed(3)
    a = pool.sample(7)
    torch.manual_seed(3)
    b = other.sample(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    new = torch.randn(3, 1, 4, 4)
    pool.add(new, torch.zeros(3, 3))
    other.add(new, torch.zeros(3, 3))
    assert torch.equal(pool.newest(12), other.newest(12)), "the ring buffer continues where it was"


def test_empty_state_round_trip():
    other = ImagePool(4)
    other.load_state_dict(roundtrip(ImagePool(4).state_dict()))
    assert len(other) == 0
    other.add(torch.ones(2, 1, 4, 4))
    assert len(other) == 2


def test_a_checkpoint_of_the_old_in_memory_pool_still_loads():
    old = {"capacity": 4, "size": 4, "next": 2, "added": 6, "dtype": "float16", "shape": [1, 4, 4], "num_labels": 2,
           "images": batch(0, 4).half(), "labels": torch.zeros(4, 2)}  # slots hold 4 5 2 3: 2 is the oldest
    old["images"][:2] = batch(4, 2).half()
    pool = ImagePool(4)
    pool.load_state_dict(old)
    assert ids(pool.newest(4)) == [2, 3, 4, 5] and pool.added == 6

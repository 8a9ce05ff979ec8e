"""The Philox normal stream: bit-exact with the numpy oracle, independent of batch split."""
import numpy as np
import pytest
import torch

import philox_oracle as oracle
from fastdiff import noise


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**40 + 12345, 2**63 - 1])
def test_integer_stream_bit_exact(seed):
    element = torch.arange(4096) * 7919
    sample = torch.arange(4096) % 13
    got = noise.philox4x32((element, sample, torch.tensor(999), torch.tensor(1)), seed)
    want = oracle.philox(element.numpy(), sample.numpy(), 999, 1, seed)
    for g, w in zip(got, want):
        assert np.array_equal(g.numpy().astype(np.uint32), w)


def test_philox_known_answer():
    # Random123's published known-answer vector for philox4x32-10 (kat_vectors): counter and key
    # all 0xFFFFFFFF (the key as the 64-bit seed here).
    got = noise.philox4x32([torch.tensor(0xFFFFFFFF)] * 4, 0xFFFFFFFF_FFFFFFFF % 2**64)
    assert [int(x) for x in got] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_normals_match_oracle():
    got = noise.randn((3, 5, 7, 11), 1234, counter=17, sample_offset=9)
    want, _ = oracle.randn((3, 5, 7, 11), 1234, counter=17, sample_offset=9)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)


def test_sample_noise_does_not_depend_on_batch():
    big = noise.randn((64, 3, 4, 4), 7, counter=3)
    for i in (0, 5, 63):
        alone = noise.randn((1, 3, 4, 4), 7, counter=3, sample_offset=i)
        assert torch.equal(alone[0], big[i])


def test_counter_and_stream_change_the_noise():
    base = noise.randn((2, 100), 7, counter=3)
    assert not torch.equal(base, noise.randn((2, 100), 7, counter=4))
    assert not torch.equal(base, noise.randn((2, 100), 7, counter=3, stream=noise.STREAM_Q_SAMPLE))
    assert not torch.equal(base, noise.randn((2, 100), 8, counter=3))


def test_statistics():
    x = noise.randn((16, 4096), 99).double()
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert abs((x**3).mean().item()) < 0.03 and abs((x**4).mean().item() - 3) < 0.06


def test_bad_seed():
    with pytest.raises(ValueError, match="seed must be an int"):
        noise.randn((1, 2), -1)


def test_element_noise_does_not_depend_on_sample_size():
    """Element e always takes normal e % 4 of Philox quad e // 4, whatever the sample's length."""
    long = noise.randn((2, 12), 5, counter=1)
    for n in (1, 5, 7, 10):
        assert torch.equal(noise.randn((2, n), 5, counter=1), long[:, :n])


def test_quad_layout_is_triton_randn4x():
    """Normals 0..3 of a quad are (r01 cos, r01 sin, r23 cos, r23 sin) of its four Philox words."""
    words = [noise.uint32_to_uniform(w) for w in noise.philox4x32([torch.tensor([2])] + [torch.tensor([0])] * 3, 9)]
    want = torch.cat([*noise.box_muller(words[0], words[1]), *noise.box_muller(words[2], words[3])])
    assert torch.equal(noise.randn((1, 12), 9, counter=0)[0, 8:12], want)

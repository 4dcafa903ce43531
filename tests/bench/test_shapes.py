"""The parameter lists the benchmarks step have the sizes their names promise."""
import math

from childopt.bench import shapes


def test_roberta_base_shapes_have_125m_parameters():
    numel = sum(math.prod(s) for s in shapes.roberta_base_shapes())
    assert 124e6 < numel < 126e6


def test_decoder_shapes_have_1_26b_parameters():
    assert 1.25e9 < sum(math.prod(s) for s in shapes.decoder_1b_shapes()) < 1.27e9

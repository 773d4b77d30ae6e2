import pytest

from kv3d.engine.budget import KVBudget
from kv3d.engine.prefix import PrefixCache, chain_blocks, cut_points, reusable_blocks

SEED = b"model-A"


def test_cut_points_whole_blocks_only():
    assert cut_points(100, 32) == [32, 64, 96]
    assert cut_points(31, 32) == []
    assert cut_points(64, 32) == [32, 64]


def test_cut_points_end_a_block_at_the_family_boundary():
    assert cut_points(100, 32, boundary=40) == [32, 40, 72]
    assert cut_points(100, 32, boundary=11) == [11, 43, 75]
    assert cut_points(100, 32, boundary=64) == [32, 64, 96]
    assert cut_points(20, 32, boundary=30) == []


def test_keys_chain_over_every_earlier_token():
    a = list(range(100))
    b = list(range(100))
    b[40] = 9999  # differs in the second block
    ka = [blk.key for blk in chain_blocks(a, 32, SEED)]
    kb = [blk.key for blk in chain_blocks(b, 32, SEED)]
    assert ka[0] == kb[0]
    assert ka[1] != kb[1] and ka[2] != kb[2]  # a later block's key covers its whole prefix


def test_same_tokens_same_keys_and_model_changes_keys():
    tokens = list(range(70))
    assert chain_blocks(tokens, 32, SEED) == chain_blocks(tokens, 32, SEED)
    other = chain_blocks(tokens, 32, b"model-B")
    assert all(x.key != y.key for x, y in zip(chain_blocks(tokens, 32, SEED), other, strict=True))


def test_family_boundary_makes_a_shared_system_prompt_one_chain():
    system = list(range(1000, 1011))  # 11 tokens, shorter than a block
    first = chain_blocks(system + [1, 2, 3] * 20, 32, SEED, boundary=11)
    second = chain_blocks(system + [7, 8] * 30, 32, SEED, boundary=11)
    assert first[0] == second[0] and first[0].end_tokens == 11
    assert first[1].key != second[1].key


def test_reusable_blocks_never_cover_the_last_prompt_token():
    prompt = list(range(64))
    blocks = reusable_blocks(prompt, 32, SEED, None)
    assert [b.end_tokens for b in blocks] == [32]  # 63 usable tokens: one whole block
    assert reusable_blocks(prompt, 32, SEED, boundary=64) == blocks  # boundary past the end


class FakeContext:
    """Records KV sequence operations; the prefix index logic needs nothing else."""

    def __init__(self):
        self.ops = []

    def seq_copy(self, src, dst, p0, p1):
        self.ops.append(("cp", src, dst, p0, p1))

    def seq_remove(self, seq, p0=-1, p1=-1):
        self.ops.append(("rm", seq))
        return True


def test_hit_shares_cells_and_collision_is_a_miss():
    ctx = FakeContext()
    cache = PrefixCache(ctx, holder_seq_ids=[8, 9], budget=KVBudget(1000))
    prompt = list(range(100))
    blocks = chain_blocks(prompt[:64], 32, SEED)
    prefix = cache.register_from(slot=0, tokens=prompt[:64], blocks=blocks)
    assert ctx.ops[-1] == ("cp", 0, prefix.seq_id, 0, 64)
    match = cache.match(reusable_blocks(prompt, 32, SEED, None), prompt)
    assert match.prefix is prefix and match.n_tokens == 64
    # Same keys, different tokens (what a hash collision looks like): never reused.
    forged = list(prompt)
    forged[5] = -1
    assert cache.match(blocks, forged) is None
    cache.attach(match, slot=3)
    assert ctx.ops[-1] == ("cp", prefix.seq_id, 3, 0, 64)
    cache.check_invariants()


def test_referenced_prefixes_are_never_evicted_and_lru_goes_first():
    ctx = FakeContext()
    cache = PrefixCache(ctx, holder_seq_ids=[8, 9], budget=KVBudget(1000))
    a = cache.register_from(0, list(range(32)), chain_blocks(list(range(32)), 32, SEED))
    b_tokens = list(range(100, 132))
    b = cache.register_from(1, b_tokens, chain_blocks(b_tokens, 32, SEED))
    assert cache.evict_unused(1) == 0  # both still referenced by their creators
    cache.release(a)
    cache.release(b)
    cache.attach(cache.match(chain_blocks(list(range(32)), 32, SEED), list(range(33))), 2)
    cache.release(a)  # a used more recently than b
    assert cache.evict_unused(1) == 32
    assert cache.num_hot == 1 and cache.hot()[0] is a
    assert cache.cells_held == 32
    cache.check_invariants()


def test_free_a_holder_evicts_only_idle_prefixes():
    cache = PrefixCache(FakeContext(), holder_seq_ids=[8], budget=KVBudget(1000))
    p = cache.register_from(0, list(range(16)), chain_blocks(list(range(16)), 16, SEED))
    assert not cache.free_a_holder()  # in use
    cache.release(p)
    assert cache.free_a_holder() and cache.num_hot == 0
    cache.check_invariants()


@pytest.mark.parametrize("n", [0, 1, 31])
def test_short_prompts_have_no_blocks(n):
    assert reusable_blocks(list(range(n)), 32, SEED, None) == []

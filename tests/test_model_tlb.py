"""The TLB model: which entries each invalidation leaves, LRU, page-walk costs, and the policies."""

from __future__ import annotations

import random

import pytest

from pykvm.model.tlb import TLB, Entry, Kind, PageSize, Policy, TLBConfig, pack_access, replay
from pykvm.model.workload import Trace, Workload

P = 0x1000  # the page most invalidations aim at
Q = 0x2000  # another page in the same 2M region
SIZE_2M = PageSize.SIZE_2M


@pytest.fixture
def filled() -> tuple[TLB, dict[str, Entry]]:
    """A TLB holding entries of the host, two guests, several PCIDs, EPTPs, global bits and kinds.

    Names: h = host (VPID/ASID 0, linear), v1/v2 = guest 1/2 (combined, under EPTP 1/2), gp = a
    guest-physical mapping; then the page (P, Q), the PCID (0, 1) or G for a global page."""
    tlb = TLB(sets=4, ways=32)
    e = {
        "h_P0": tlb.fill(P, tag=0, pcid=0),
        "h_P1": tlb.fill(P, tag=0, pcid=1),
        "h_Q0": tlb.fill(Q, tag=0, pcid=0),
        "h_PG": tlb.fill(P, tag=0, global_=True),
        "v1_P0": tlb.fill(P, tag=1, pcid=0, eptp=1),
        "v1_P1": tlb.fill(P, tag=1, pcid=1, eptp=1),
        "v1_Q1": tlb.fill(Q, tag=1, pcid=1, eptp=1),
        "v1_PG": tlb.fill(P, tag=1, eptp=1, global_=True),
        "v1_Q0_eptp3": tlb.fill(Q, tag=1, pcid=0, eptp=3),  # VPID 1 under another EPTP (EPTP switching)
        "v1_2M1": tlb.fill(0, tag=1, pcid=1, eptp=1, size=SIZE_2M),  # a 2M page holding P and Q
        "v2_P0": tlb.fill(P, tag=2, pcid=0, eptp=2),
        "v2_QG": tlb.fill(Q, tag=2, eptp=2, global_=True),
        "gp_P_eptp1": tlb.fill_guest_physical(P, eptp=1),
        "gp_P_eptp2": tlb.fill_guest_physical(P, eptp=2),
        "gp_Q_asid2": tlb.fill_guest_physical(Q, eptp=2, tag=2),  # SVM: nested translations of ASID 2
    }
    assert len(set(e.values())) == len(e) == len(tlb)
    return tlb, e


def survivors(tlb: TLB, names: dict[str, Entry]) -> set[str]:
    present = tlb.entries()
    assert present <= set(names.values()), "an invalidation created entries"
    return {name for name, entry in names.items() if entry in present}


def removed_by(filled, operation) -> set[str]:
    tlb, names = filled
    before = set(names)
    count = operation(tlb)
    gone = before - survivors(tlb, names)
    assert count == len(gone), "the returned count is the number of entries removed"
    return gone


V1 = {"v1_P0", "v1_P1", "v1_Q1", "v1_PG", "v1_Q0_eptp3", "v1_2M1"}
ALL = {"h_P0", "h_P1", "h_Q0", "h_PG", *V1, "v2_P0", "v2_QG", "gp_P_eptp1", "gp_P_eptp2", "gp_Q_asid2"}


def test_entries_decode_what_was_filled(filled):
    _, e = filled
    assert e["v1_P1"] == Entry(Kind.COMBINED, 1, 1, P, PageSize.SIZE_4K, False, 1)
    assert e["h_PG"] == Entry(Kind.LINEAR, 0, None, P, PageSize.SIZE_4K, True, None)
    assert e["gp_P_eptp1"] == Entry(Kind.GUEST_PHYSICAL, 0, None, P, PageSize.SIZE_4K, False, 1)
    assert e["v1_2M1"].address == 0 and e["v1_2M1"].size is SIZE_2M


# ---- VMX transitions, INVVPID, INVEPT --------------------------------------------------------------


def test_vm_entry_or_exit_without_vpid_flushes_vpid_0_linear_and_combined(filled):
    assert removed_by(filled, lambda t: t.vmx_transition(vpid_enabled=False)) == {"h_P0", "h_P1", "h_Q0", "h_PG"}


def test_vm_entry_or_exit_with_vpid_flushes_nothing(filled):
    assert removed_by(filled, lambda t: t.vmx_transition(vpid_enabled=True)) == set()


def test_vm_transition_without_vpid_flushes_a_guest_running_as_vpid_0():
    tlb = TLB(sets=4, ways=8)
    guest = tlb.fill(P, tag=0, pcid=0, eptp=5)
    gpa = tlb.fill_guest_physical(P, eptp=5)
    tlb.vmx_transition(vpid_enabled=False)
    assert tlb.entries() == {gpa} and guest not in tlb.entries()


def test_invvpid_individual_address(filled):
    # one page of VPID 1: every PCID, global too, every EPTP, the 2M page holding it; not page Q
    assert removed_by(filled, lambda t: t.invvpid(0, 1, P + 0x123)) == {"v1_P0", "v1_P1", "v1_PG", "v1_2M1"}


def test_invvpid_single_context(filled):
    assert removed_by(filled, lambda t: t.invvpid(1, 1)) == V1


def test_invvpid_all_context_spares_vpid_0_and_guest_physical(filled):
    assert removed_by(filled, lambda t: t.invvpid(2)) == V1 | {"v2_P0", "v2_QG"}


def test_invvpid_single_context_retaining_globals(filled):
    assert removed_by(filled, lambda t: t.invvpid(3, 1)) == V1 - {"v1_PG"}


def test_invept_single_context_removes_what_one_eptp_derived(filled):
    # combined and guest-physical mappings of EPTP 1, whatever their VPID and PCID; not EPTP 3's
    assert removed_by(filled, lambda t: t.invept(1, 1)) == V1 - {"v1_Q0_eptp3"} | {"gp_P_eptp1"}


def test_invept_global_removes_every_combined_and_guest_physical_mapping(filled):
    assert removed_by(filled, lambda t: t.invept(2)) == ALL - {"h_P0", "h_P1", "h_Q0", "h_PG"}


def test_invvpid_and_invept_differ_on_guest_physical_mappings(filled):
    tlb, e = filled
    tlb.invvpid(2)
    assert tlb.lookup_guest_physical(P, eptp=1) == e["gp_P_eptp1"]
    tlb.invept(2)
    assert tlb.lookup_guest_physical(P, eptp=1) is None


# ---- SVM: TLB_CONTROL and INVLPGA ---------------------------------------------------------------------


@pytest.mark.parametrize("value, removed", [
    (0, set()),
    (1, ALL),
    (3, {"v2_P0", "v2_QG", "gp_Q_asid2"}),
    (7, {"v2_P0", "gp_Q_asid2"}),
])
def test_vmcb_tlb_control(filled, value, removed):
    assert removed_by(filled, lambda t: t.tlb_control(value, asid=2)) == removed


def test_invlpga_one_page_of_one_asid(filled):
    assert removed_by(filled, lambda t: t.invlpga(P, asid=1)) == {"v1_P0", "v1_P1", "v1_PG", "v1_2M1"}


def test_invlpga_takes_global_entries_of_its_asid_only(filled):
    assert removed_by(filled, lambda t: t.invlpga(Q, asid=2)) == {"v2_QG"}


# ---- instructions a (guest) kernel executes -----------------------------------------------------------


def test_invlpg_current_pcid_and_global_entries_of_the_page(filled):
    # VPID 1, PCID 1: P in PCID 1 (4K and 2M) and the global P; not P in PCID 0, nor other VPIDs
    assert removed_by(filled, lambda t: t.invlpg(P, tag=1, pcid=1)) == {"v1_P1", "v1_PG", "v1_2M1"}


def test_invlpg_on_the_host(filled):
    assert removed_by(filled, lambda t: t.invlpg(P, tag=0, pcid=0)) == {"h_P0", "h_PG"}


def test_invpcid_individual_address_spares_globals(filled):
    assert removed_by(filled, lambda t: t.invpcid(0, tag=1, pcid=1, va=P)) == {"v1_P1", "v1_2M1"}


def test_invpcid_single_context_spares_globals(filled):
    assert removed_by(filled, lambda t: t.invpcid(1, tag=1, pcid=1)) == {"v1_P1", "v1_Q1", "v1_2M1"}


def test_invpcid_all_context_including_globals(filled):
    assert removed_by(filled, lambda t: t.invpcid(2, tag=1)) == V1


def test_invpcid_all_context_except_globals(filled):
    assert removed_by(filled, lambda t: t.invpcid(3, tag=1)) == V1 - {"v1_PG"}


def test_mov_cr3_flushes_the_new_pcids_non_global_entries(filled):
    assert removed_by(filled, lambda t: t.mov_cr3(1, tag=1)) == {"v1_P1", "v1_Q1", "v1_2M1"}


def test_mov_cr3_with_the_no_flush_bit_flushes_nothing(filled):
    assert removed_by(filled, lambda t: t.mov_cr3(1, tag=1, noflush=True)) == set()


def test_mov_cr3_without_pcide_flushes_pcid_0_non_global(filled):
    assert removed_by(filled, lambda t: t.mov_cr3(0, tag=0, pcide=False)) == {"h_P0", "h_Q0"}


def test_flush_all(filled):
    tlb, _ = filled
    assert removed_by(filled, lambda t: t.flush_all()) == ALL
    assert len(tlb) == 0 and tlb.pwc() == set()


def test_global_entry_matches_every_pcid_of_its_tag_only():
    tlb = TLB(sets=4, ways=4)
    g = tlb.fill(P, tag=3, pcid=7, eptp=3, global_=True)
    assert tlb.lookup(P, tag=3, pcid=9, eptp=3) == g
    assert tlb.lookup(P, tag=4, pcid=9, eptp=3) is None
    assert tlb.lookup(P, tag=3, pcid=9, eptp=4) is None  # another EPTP: a different combined mapping
    assert tlb.translate(P, tag=3, pcid=1, eptp=3, global_=True) == 0


@pytest.mark.parametrize("call, message", [
    (lambda t: t.invvpid(1, 0), "VPID 0"),
    (lambda t: t.invvpid(0, 0, P), "VPID 0"),
    (lambda t: t.invvpid(4, 1), "INVVPID type"),
    (lambda t: t.invept(0), "INVEPT type"),
    (lambda t: t.invpcid(4), "INVPCID type"),
    (lambda t: t.tlb_control(2, 1), "reserved"),
    (lambda t: t.tlb_control(3, 0), "ASID 0"),
    (lambda t: t.mov_cr3(1, pcide=False), "PCIDE=0"),
    (lambda t: t.mov_cr3(0, pcide=False, noflush=True), "bit 63"),
    (lambda t: t.fill(P, tag=1 << 16), "VPID/ASID"),
    (lambda t: t.fill(P, pcid=4096), "PCID"),
    (lambda t: t.invlpg(-1), "address"),
])
def test_invalid_operands_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(TLB())


# ---- replacement --------------------------------------------------------------------------------------


def test_lru_eviction_in_a_set():
    tlb = TLB(sets=1, ways=2, pwc_entries=())
    a, b = tlb.fill(0x1000), tlb.fill(0x2000)
    assert tlb.translate(0x1000) == 0  # a is now the most recently used
    c = tlb.fill(0x3000)
    assert tlb.entries() == {a, c}
    tlb.translate(0x4000)  # a miss: evicts a, the least recently used now
    assert tlb.entries() == {c, tlb.lookup(0x4000)} and b not in tlb.entries()


def test_sets_are_indexed_by_page_number():
    tlb = TLB(sets=2, ways=1, pwc_entries=())
    even, odd = tlb.fill(0x0000), tlb.fill(0x1000)
    assert tlb.entries() == {even, odd}  # different sets: no eviction
    tlb.fill(0x2000)
    assert odd in tlb.entries() and even not in tlb.entries()


def test_second_level_catches_first_level_victims():
    tlb = TLB(sets=1, ways=1, l2_sets=1, l2_ways=4, pwc_entries=())
    assert tlb.translate(0x1000) == 4
    assert tlb.translate(0x2000) == 4
    assert tlb.translate(0x1000) == 0  # an L1 miss, an L2 hit: no walk
    assert {e.address for e in tlb.entries(level=1)} == {0x1000}
    assert {e.address for e in tlb.entries(level=2)} == {0x1000, 0x2000}
    tlb.invlpg(0x2000)
    assert {e.address for e in tlb.entries(level=2)} == {0x1000}


# ---- page walks and the paging-structure caches ---------------------------------------------------------


def test_walk_costs_come_from_the_paging_model():
    from pykvm.model.paging import walk_reference_count

    tlb = TLB()
    assert tlb.walk_cost_1d[4] == walk_reference_count(4) == 4
    assert tlb.walk_cost_2d[4] == walk_reference_count(4, 4) == 24


def test_one_and_two_dimensional_walks_shortened_by_the_pwc():
    tlb = TLB(sets=16, ways=4)
    assert tlb.translate(0x1000) == 4  # host, cold: PML4E, PDPTE, PDE, PTE
    assert tlb.translate(0x2000) == 1  # same 2M region: the PDE cache leaves the PTE
    assert tlb.translate(0x1000) == 0  # a TLB hit
    assert tlb.translate(0x4020_0000) == 3  # another 1G region: the PML4E cache hits
    assert tlb.translate(0x4000_0000, tag=1, eptp=1) == 24  # guest under EPT, cold: (4+1)(4+1)-1
    assert tlb.translate(0x4000_1000, tag=1, eptp=1) == 9  # PDE hit: 1 guest level + nested walks
    assert tlb.translate(0x4020_0000, tag=1, eptp=1) == 14  # PDPTE hit: 2 guest levels
    assert tlb.translate(0x20_0000, size=SIZE_2M) == 1  # a 2M page, its leaf a PDE: the PDPTE is cached
    assert tlb.translate(0x8000_0000, size=SIZE_2M) == 2  # another 1G region: PDPTE and PDE


def test_five_level_paging_under_five_level_ept():
    tlb = TLB(guest_levels=5, nested_levels=5)
    assert tlb.translate(P, tag=1, eptp=1) == 35
    assert tlb.translate(Q, tag=1, eptp=1) == 11  # (1+1)(5+1)-1


def test_pwc_entries_are_tagged_and_flushed_with_their_context():
    tlb = TLB()
    tlb.translate(0x1000, tag=1, pcid=1, eptp=1)
    tlb.translate(0x7F00_0000_0000, tag=1, pcid=1, eptp=1)
    tlb.translate(0x1000, tag=1, pcid=2, eptp=1)
    assert {(e.pcid, e.level) for e in tlb.pwc()} == {(1, 4), (1, 3), (1, 2), (2, 4), (2, 3), (2, 2)}
    assert len([e for e in tlb.pwc() if e.pcid == 1]) == 6  # two walks in different PML4 slots
    tlb.invpcid(0, tag=1, pcid=1, va=0x1000)  # the entries on the way to that address only
    assert sorted(e.address for e in tlb.pwc() if e.pcid == 1) == [0x7F00_0000_0000] * 3
    tlb.invlpg(0x5000, tag=1, pcid=1)  # INVLPG: every PSC entry of the current PCID
    assert {e.pcid for e in tlb.pwc()} == {2}
    assert tlb.translate(0x3000, tag=1, pcid=2, eptp=1) == 9  # PCID 2's PDE still cached
    tlb.mov_cr3(2, tag=1)
    assert tlb.pwc() == set()
    assert tlb.translate(0x3000, tag=1, pcid=2, eptp=1) == 24


def test_translate_and_replay_agree():
    rng = random.Random(5)
    vas = [rng.randrange(64) * 0x1000 + rng.choice((0, 0x7F00_0000_0000)) for _ in range(3000)]
    trace = Trace([pack_access(va) for va in vas], [(0, ("W", 1)), (0, ("C", 1, 3))])
    config = TLBConfig(sets=4, ways=2, levels=2, l2_sets=8, l2_ways=2)
    stats = replay(trace, Policy.TAGGED_PCID, config)
    tlb = config.build()
    refs = [tlb.translate(va, tag=1, pcid=3, eptp=1) for va in vas]
    assert stats.walk_refs_2d == sum(refs) and stats.walk_refs_1d == 0
    assert stats.misses == stats.walks_2d == sum(1 for r in refs if r)
    assert stats.hits + stats.misses == stats.accesses == len(vas)


# ---- policies -----------------------------------------------------------------------------------------


def run_policies(workload: Workload) -> dict[str, object]:
    trace = workload.generate()
    return {p.value: replay(trace, p) for p in Policy}


def test_tagging_cuts_misses_at_a_high_world_switch_rate():
    stats = run_policies(Workload(accesses=60_000, world_switch_every=50, seed=7))
    untagged, tagged, pcid = stats["untagged"], stats["tagged"], stats["tagged+pcid"]
    assert untagged.world_switches == tagged.world_switches > 1000
    assert tagged.misses < untagged.misses
    assert pcid.misses <= tagged.misses
    assert tagged.walk_refs_2d < untagged.walk_refs_2d
    assert untagged.flushes > tagged.flushes > pcid.flushes == 0


def test_without_world_switches_untagged_and_tagged_miss_alike():
    stats = run_policies(Workload(accesses=20_000, world_switch_every=0, seed=2))
    assert stats["untagged"].world_switches == 1  # entering the first VM
    assert stats["untagged"].misses == stats["tagged"].misses
    assert stats["tagged+pcid"].misses < stats["tagged"].misses


def test_the_workload_is_deterministic_for_a_seed():
    a = Workload(accesses=5000, seed=11).generate()
    b = Workload(accesses=5000, seed=11).generate()
    c = Workload(accesses=5000, seed=12).generate()
    assert (a.pages, a.events) == (b.pages, b.events)
    assert a.pages != c.pages
    assert len(a.pages) == 5000


def test_workload_rates():
    trace = Workload(accesses=100_000, world_switch_every=100, context_switch_every=500, host_accesses=10,
                     seed=1).generate()
    counts = trace.counts()
    exits = counts["W"] // 2
    guest_accesses = trace.accesses - 10 * exits
    assert 0.8 < guest_accesses / exits / 100 < 1.2
    assert 0.8 < guest_accesses / (counts["C"] - 4) / 500 < 1.2  # less each VM's first PCID


def test_workload_parameters_are_checked():
    with pytest.raises(ValueError, match="vms"):
        Workload(vms=0)
    with pytest.raises(ValueError, match="kernel_fraction"):
        Workload(kernel_fraction=1.5)

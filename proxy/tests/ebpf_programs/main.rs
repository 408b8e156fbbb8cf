//! Datapath tests of the eBPF programs embedded in the agent: each test loads the object with aya
//! (so the verifier of this kernel checks every program), fills the maps like the agent does, and
//! runs the TC programs on crafted packets with BPF_PROG_TEST_RUN. Checksums of the output are
//! recomputed here, independently of the programs' own arithmetic.
//!
//! A packet crossing the node meets the ingress program of the interface it arrives on and, unless netfilter is
//! bypassed, the egress program of the interface it leaves by (`Datapath::cross`); by default the node's stack
//! (routing, netfilter) runs in between and sees the packet between the two.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Nothing is attached and nothing is pinned: the maps and
//! programs disappear with the test process.
//!
//! Every test thread first moves into a network namespace of its own (`unshare(CLONE_NEWNET)`, which
//! is per thread): with netfilter bypassed the programs forward translated packets after a FIB lookup, so the
//! routes of the namespace a program runs in decide its verdict. In a fresh namespace forwarding is off, the FIB
//! declines and translated packets go to the stack (TC_ACT_OK); the forwarding test builds the routes it needs
//! there. The namespaces die with their threads.
//!
//! One file per behaviour, as Cilium's bpf/tests: `translation` (DNAT, reverse NAT, backend choice), `masquerade`,
//! `conntrack` (lifetimes, masquerade ports, the collector), `reject` (no endpoints, source ranges), `icmp`, `ipv6`,
//! `forwarding` (what reaches the stack; the bypass path), `drops` (a counted reason for each). The per-packet
//! cost at 1 and 10,000 Services is a test of the bench (`bench/src/tccost.rs`), next to the measurement it guards.

mod harness;

mod conntrack;
mod drops;
mod forwarding;
mod icmp;
mod ipv6;
mod masquerade;
mod reject;
mod translation;

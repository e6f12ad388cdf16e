//! Loading, attaching and draining the eBPF side. (Being written.)

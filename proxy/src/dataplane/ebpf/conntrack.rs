//! The user-space half of the eBPF conntrack: a garbage collector that deletes expired entries (the programs
//! already treat them as gone and take them over, but only the collector gives their memory and capacity back),
//! relieves a nearly full map the way the kernel's `early_drop` does (unanswered flows go first, established
//! ones never), and counts what the maps hold for the metrics.
//!
//! Entries are read in batches (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6), so reading a million entries is a few hundred
//! system calls; each doomed entry is looked at again right before it is deleted (see `reap`). The collector runs
//! more often as the map fills.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::maps::MapData;
use orca_common::{Addr, CtKey, CtTimeouts, CtValue, In6, CT_DIR_INNER, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_SEEN_REPLY};

/// What the collector found in its last pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtCounts {
    /// Entries in the conntrack map after the pass, and its capacity.
    pub entries: u64,
    pub capacity: u64,
    /// Live entries per role.
    pub service: u64,
    pub reply: u64,
    pub inner: u64,
    /// Masquerade ports held (reply entries of masqueraded flows).
    pub snat_ports: u64,
    /// Entries deleted since the agent started: expired, and unanswered ones dropped under pressure.
    pub expired_deleted: u64,
    pub pressure_deleted: u64,
    /// Entries of the other maps (name, count), counted in the same pass.
    pub other_maps: Vec<(&'static str, u64)>,
    pub passes: u64,
}

impl CtCounts {
    /// The sums of two maps' counts (IPv4 and IPv6).
    pub fn plus(mut self, o: &CtCounts) -> CtCounts {
        self.entries += o.entries;
        self.capacity += o.capacity;
        self.service += o.service;
        self.reply += o.reply;
        self.inner += o.inner;
        self.snat_ports += o.snat_ports;
        self.expired_deleted += o.expired_deleted;
        self.pressure_deleted += o.pressure_deleted;
        self
    }
}

/// Above this share of the capacity, unanswered flows idle for `PRESSURE_MIN_IDLE` are deleted (as the kernel's
/// conntrack drops unassured entries when it is full); established flows are never deleted to make room.
const PRESSURE_SHARE: f64 = 0.9;
const PRESSURE_MIN_IDLE: Duration = Duration::from_secs(1);

/// How long the collector waits between passes at a given occupancy: every 10 s while the map is less than half
/// full, every 2 s up to 80 %, every 500 ms above (new flows take expired entries over anyway; the passes give
/// capacity back before the map fills).
pub fn interval(entries: u64, capacity: u64) -> Duration {
    let share = if capacity == 0 {
        0.0
    } else {
        entries as f64 / capacity as f64
    };
    if share < 0.5 {
        Duration::from_secs(10)
    } else if share < 0.8 {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(500)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Why an entry goes: expired, or dropped under pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Expired,
    Pressure,
}

/// The collector's decision for one entry (the same rule the programs use to take entries over: reclaimable,
/// that is expired for longer than the tick by which a flow's entries may lag each other).
pub fn verdict<A: Addr>(key: &CtKey<A>, v: &CtValue<A>, now_ns: u64, t: &CtTimeouts, pressure: bool) -> Verdict {
    if v.reclaimable(key.proto, now_ns, t) {
        return Verdict::Expired;
    }
    let idle = now_ns.saturating_sub(v.last_seen_ns);
    if pressure && v.flags & CT_F_SEEN_REPLY == 0 && idle >= PRESSURE_MIN_IDLE.as_nanos() as u64 {
        return Verdict::Pressure;
    }
    Verdict::Keep
}

/// Counts a live entry in its role.
fn count_live<A: Addr>(counts: &mut CtCounts, k: &CtKey<A>, v: &CtValue<A>) {
    match k.dir {
        CT_DIR_SERVICE => counts.service += 1,
        CT_DIR_REPLY => {
            counts.reply += 1;
            if !v.nat_addr.is_zero() {
                counts.snat_ports += 1;
            }
        }
        CT_DIR_INNER => counts.inner += 1,
        _ => {}
    }
}

/// Reads the conntrack map without changing it (for `orca-proxy status`): live entries per role, and in
/// `expired_deleted` the entries that are expired and wait for the collector.
pub fn census(ct: &MapData, t: &CtTimeouts) -> Result<CtCounts> {
    census_in::<u32>(ct, t)
}

/// `census` of a family's map.
pub fn census_in<A: Addr>(ct: &MapData, t: &CtTimeouts) -> Result<CtCounts> {
    let fd = ct.fd().as_fd().as_raw_fd();
    let now = monotonic_ns();
    let mut entries: Vec<(CtKey<A>, CtValue<A>)> = Vec::new();
    batch::lookup_all(fd, &mut entries).context("reading the conntrack map")?;
    let mut counts = CtCounts {
        entries: entries.len() as u64,
        capacity: u64::from(ct.info()?.max_entries()),
        ..Default::default()
    };
    for (k, v) in &entries {
        match verdict(k, v, now, t, false) {
            Verdict::Keep => count_live(&mut counts, k, v),
            _ => counts.expired_deleted += 1,
        }
    }
    Ok(counts)
}

/// One pass over the conntrack map: deletes what `verdict` says, counts the rest.
pub fn pass(ct: &MapData, capacity: u64, t: &CtTimeouts, totals: &mut CtCounts) -> Result<()> {
    pass_in::<u32>(ct, capacity, t, totals)
}

/// `pass` over a family's map: a `survey`, then a `reap`.
pub fn pass_in<A: Addr>(ct: &MapData, capacity: u64, t: &CtTimeouts, totals: &mut CtCounts) -> Result<()> {
    let found = survey::<A>(ct, capacity, t)?;
    reap(ct, found, t, totals)
}

/// What the first half of a pass found: the live entries counted, and the entries it would delete.
pub struct Survey<A: Addr> {
    counts: CtCounts,
    entries: usize,
    pressure: bool,
    doomed: Vec<CtKey<A>>,
}

impl<A: Addr> Survey<A> {
    /// The keys the pass means to delete.
    pub fn doomed(&self) -> &[CtKey<A>] {
        &self.doomed
    }
}

/// The first half of a pass: reads the whole map at once and judges every entry.
pub fn survey<A: Addr>(ct: &MapData, capacity: u64, t: &CtTimeouts) -> Result<Survey<A>> {
    let fd = ct.fd().as_fd().as_raw_fd();
    let now = monotonic_ns();
    let mut entries: Vec<(CtKey<A>, CtValue<A>)> = Vec::new();
    batch::lookup_all(fd, &mut entries).context("reading the conntrack map")?;
    let pressure = entries.len() as f64 >= PRESSURE_SHARE * capacity as f64;
    let mut found = Survey {
        counts: CtCounts {
            capacity,
            ..Default::default()
        },
        entries: entries.len(),
        pressure,
        doomed: Vec::new(),
    };
    for (k, v) in &entries {
        match verdict(k, v, now, t, pressure) {
            Verdict::Keep => count_live(&mut found.counts, k, v),
            Verdict::Expired | Verdict::Pressure => found.doomed.push(*k),
        }
    }
    Ok(found)
}

/// The second half of a pass: deletes the doomed entries, each judged again as it is now. Reading a large map
/// takes a while, and meanwhile the programs may have given an expired entry to a new flow (a new connection on
/// an expired tuple, a masquerade port taken back): deleting that key blindly would delete the new flow's entry,
/// and a reply that finds no entry is lost (the node answers it with a reset, and the client waits for an answer
/// that never comes). The fresh look and the deletion are two system calls apart, not a whole pass.
pub fn reap<A: Addr>(ct: &MapData, found: Survey<A>, t: &CtTimeouts, totals: &mut CtCounts) -> Result<()> {
    let fd = ct.fd().as_fd().as_raw_fd();
    let Survey {
        mut counts,
        entries,
        pressure,
        doomed,
    } = found;
    let mut deleted = 0usize;
    for k in &doomed {
        let Some(v) = batch::lookup::<CtKey<A>, CtValue<A>>(fd, k).context("reading a conntrack entry")? else {
            continue;
        };
        match verdict(k, &v, monotonic_ns(), t, pressure) {
            // Taken over or refreshed since the survey: it stays.
            Verdict::Keep => {
                count_live(&mut counts, k, &v);
                continue;
            }
            Verdict::Expired => totals.expired_deleted += 1,
            Verdict::Pressure => totals.pressure_deleted += 1,
        }
        if batch::delete_one(fd, k).context("deleting an expired conntrack entry")? {
            deleted += 1;
        }
    }
    counts.entries = entries.saturating_sub(deleted) as u64;
    totals.entries = counts.entries;
    totals.capacity = counts.capacity;
    totals.service = counts.service;
    totals.reply = counts.reply;
    totals.inner = counts.inner;
    totals.snat_ports = counts.snat_ports;
    totals.passes += 1;
    Ok(())
}

/// Counts the entries of a hash map.
pub fn count(map: &MapData) -> Result<u64> {
    let info = map.info()?;
    let mut n = 0;
    batch::for_each(
        map.fd().as_fd().as_raw_fd(),
        info.key_size() as usize,
        info.value_size() as usize,
        |_, _| n += 1,
    )?;
    Ok(n)
}

/// The collector thread.
pub struct Collector {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub counts: Arc<Mutex<CtCounts>>,
}

impl Collector {
    /// Starts collecting the conntrack maps (both families) pinned in `maps_dir`; also counts the other maps named
    /// in `others`. The counts are the two maps' sums.
    pub fn start(maps_dir: &Path, capacity: u32, timeouts: CtTimeouts, others: &[&'static str]) -> Result<Self> {
        let open = |name: &str| -> Result<MapData> {
            let p = maps_dir.join(name);
            MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))
        };
        let ct = open(orca_common::MAP_CT)?;
        let ct6 = open(orca_common::MAP_CT6)?;
        let others: Vec<(&'static str, MapData)> =
            others.iter().map(|n| open(n).map(|m| (*n, m))).collect::<Result<_>>()?;
        let counts = Arc::new(Mutex::new(CtCounts {
            capacity: 2 * u64::from(capacity),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, shared) = (stop.clone(), counts.clone());
        let thread = std::thread::Builder::new()
            .name("orca-ct-gc".into())
            .spawn(move || {
                let mut totals = CtCounts::default();
                let mut totals6 = CtCounts::default();
                let mut next = Instant::now();
                let mut failing = false;
                while !flag.load(Ordering::Relaxed) {
                    if Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    let started = Instant::now();
                    let passed = pass(&ct, u64::from(capacity), &timeouts, &mut totals)
                        .and_then(|()| pass_in::<In6>(&ct6, u64::from(capacity), &timeouts, &mut totals6));
                    match passed {
                        Ok(()) => {
                            if failing {
                                tracing::info!("conntrack garbage collection works again");
                                failing = false;
                            }
                        }
                        Err(e) => {
                            if !failing {
                                tracing::error!(error = format!("{e:#}"), "conntrack garbage collection failed");
                                failing = true;
                            }
                        }
                    }
                    let mut both = totals.clone().plus(&totals6);
                    both.other_maps = others.iter().map(|(n, m)| (*n, count(m).unwrap_or(0))).collect();
                    tracing::debug!(
                        entries = totals.entries,
                        entries6 = totals6.entries,
                        expired_deleted = both.expired_deleted,
                        took_ms = started.elapsed().as_millis() as u64,
                        "conntrack pass"
                    );
                    // The fuller map sets the pace.
                    next = Instant::now()
                        + interval(totals.entries, totals.capacity).min(interval(totals6.entries, totals6.capacity));
                    if let Ok(mut c) = shared.lock() {
                        *c = both;
                    }
                }
            })
            .context("starting the conntrack collector")?;
        Ok(Self {
            stop,
            thread: Some(thread),
            counts,
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (aya has no batch API) and the two element commands the collector uses with it, through
/// the raw system call.
pub mod batch {
    use std::io;

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

    /// `bpf_attr` of the element commands.
    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
        // SAFETY: attr is a valid, fully initialised bpf_attr prefix (`BatchAttr`, `ElemAttr`) of the size passed.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Calls `each(key, value)` for every entry of the hash map `fd`, whose keys and values have the given sizes.
    pub fn for_each(fd: i32, key_size: usize, value_size: usize, mut each: impl FnMut(&[u8], &[u8])) -> io::Result<()> {
        let mut chunk = 4096usize;
        let mut token: u32 = 0;
        let mut first = true;
        loop {
            let mut keys = vec![0u8; chunk * key_size];
            let mut values = vec![0u8; chunk * value_size];
            let mut out_token: u32 = 0;
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &mut token as *mut u32 as u64 },
                out_batch: &mut out_token as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(chunk);
            let done = match r {
                Ok(()) => false,
                // The end of the map (the last batch may still carry entries).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                // A bucket holds more entries than the batch: retry it with a larger batch.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                    chunk *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for i in 0..n {
                each(
                    &keys[i * key_size..(i + 1) * key_size],
                    &values[i * value_size..(i + 1) * value_size],
                );
            }
            if done {
                return Ok(());
            }
            token = out_token;
            first = false;
        }
    }

    /// Every (key, value) of a hash map of `K` -> `V` (plain-data types of the map's exact sizes).
    pub fn lookup_all<K: Copy, V: Copy>(fd: i32, out: &mut Vec<(K, V)>) -> io::Result<()> {
        let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
        for_each(fd, ks, vs, |k, v| {
            // SAFETY: the slices are exactly size_of::<K>() / size_of::<V>() bytes; K and V are plain data (every
            // bit pattern valid); unaligned reads.
            unsafe {
                out.push((
                    std::ptr::read_unaligned(k.as_ptr().cast::<K>()),
                    std::ptr::read_unaligned(v.as_ptr().cast::<V>()),
                ))
            }
        })
    }

    /// The value under `key` in the hash map `fd` of `K` -> `V` (plain-data types of the map's exact sizes); `None`
    /// when there is none.
    pub fn lookup<K: Copy, V: Copy>(fd: i32, key: &K) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::uninit();
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            key: key as *const K as u64,
            value: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            // SAFETY: the kernel wrote the whole value (the map's value size is size_of::<V>()); V is plain data.
            Ok(()) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes `key` from the hash map `fd`; false when it was gone already.
    pub fn delete_one<K: Copy>(fd: i32, key: &K) -> io::Result<bool> {
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            key: key as *const K as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

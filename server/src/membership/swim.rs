//! SWIM gossip with foca over UDP, authenticated, plus heartbeats for the phi detector and ring
//! metadata as foca custom broadcasts. One task (the driver) owns the `Foca` instance, the UDP
//! socket, the timer heap and the phi detector (shared/notes/foca.md §3).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, Identity, Invalidates, OwnedNotification,
    PostcardCodec, State, Timer,
};
use hmac::{Hmac, Mac};
use ringkv_protocol::peer::MemberInfo;
use ringkv_protocol::{MemberStatus, MembersReply, SWIM_STATE_NAMES};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::layout::{Layout, LayoutId};
use super::phi::{PhiConfig, PhiDetector};
use super::{ClusterView, LayoutSeen, NoData};
use crate::background::{Progress, Worker, WorkerState};
use crate::ring::NodeId;

/// A member's identity in SWIM: who it is, where to reach it, and which process generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingId {
    pub node_id: String,
    pub gossip: SocketAddr,
    pub peer: SocketAddr,
    pub client: SocketAddr,
    /// Process start time in ms, above the previous process's (`next_generation`); +1 on every
    /// automatic rejoin. A restarted node has a larger generation, so its new identity wins
    /// over the old one at the same address.
    pub generation: u64,
}

impl Identity for RingId {
    /// Members are keyed by gossip address (so a seed can be announced to by address alone).
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(RingId {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        (self.generation, &self.node_id) > (other.generation, &other.node_id)
    }
}

/// Ring status of a member, disseminated as metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RingStatus {
    /// Not (yet) an owner: started and waiting for a plan, or receiving its ranges.
    Joining,
    Normal,
    /// An owner that a running plan takes out (leave, remove, replace).
    Leaving,
    /// Out of the ring (retired by a completed plan).
    Removed,
}

impl RingStatus {
    pub fn code(self) -> u8 {
        match self {
            RingStatus::Joining => 0,
            RingStatus::Normal => 1,
            RingStatus::Leaving => 2,
            RingStatus::Removed => 3,
        }
    }
}

/// A member's ring metadata; the newest `version` per node wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMeta {
    pub node_id: String,
    /// Strictly increasing per node, across republications and restarts
    /// (`next_meta_version`).
    pub version: u64,
    pub status: RingStatus,
    pub vnodes: u32,
    /// The version and digest of the layout this node has (peers fetch a newer one from it).
    pub layout_version: u64,
    pub layout_digest: u64,
    /// The newest layout whose incoming transfers this node completed.
    pub synced: LayoutId,
    /// This node asks to be joined automatically while it owns nothing (`--auto-join`).
    pub auto_join: bool,
    /// Every write this node still coordinates started under this layout or a newer one.
    pub drained: LayoutId,
    /// Retired, this node holds no data and no hint any more (the claimant records it in the
    /// layout's `released`; a retired node joins again only then).
    #[serde(default)]
    pub holds_nothing: bool,
}

pub struct MetaKey {
    node_id: String,
    version: u64,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node_id == other.node_id && self.version >= other.version
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable ring metadata: {0}")]
pub struct MetaError(String);

type MetaTable = Arc<Mutex<BTreeMap<String, RingMeta>>>;

/// Keeps the newest metadata per node; tells foca to re-send only news.
pub struct MetaHandler {
    table: MetaTable,
}

impl BroadcastHandler<RingId> for MetaHandler {
    type Key = MetaKey;
    type Error = MetaError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&RingId>,
    ) -> Result<Option<MetaKey>, MetaError> {
        let meta: RingMeta = postcard::from_bytes(data).map_err(|e| MetaError(e.to_string()))?;
        let mut table = self.table.lock().expect("meta table lock poisoned");
        if table
            .get(&meta.node_id)
            .is_some_and(|old| old.version >= meta.version)
        {
            return Ok(None);
        }
        let key = MetaKey {
            node_id: meta.node_id.clone(),
            version: meta.version,
        };
        table.insert(meta.node_id.clone(), meta);
        Ok(Some(key))
    }
}

crate::metrics::metric_set! {
    /// Gossip counters (registered under `gossip.`).
    pub struct GossipStats {
        packets_in: Counter = "packets_in", "gossip packets received";
        packets_out: Counter = "packets_out", "gossip packets sent";
        heartbeats_in: Counter = "heartbeats_in", "phi heartbeats received";
        rejected_short: Counter = "rejected_short", "packets too short for the envelope";
        rejected_version: Counter = "rejected_version", "packets of an unknown envelope version";
        rejected_cluster: Counter = "rejected_cluster", "packets of another cluster";
        rejected_mac: Counter = "rejected_mac", "packets whose MAC did not verify (wrong secret)";
        rejected_stale: Counter = "rejected_stale", "packets outside the replay window";
        rejected_replayed: Counter = "rejected_replayed", "packets this process sent, received back (replayed on the network or looped back): not another process with its node id";
        foca_errors: Counter = "foca_errors", "errors reported by foca";
        members_down: Counter = "members_down_events", "members declared down";
        local_pauses: Counter = "local_pauses", "times the membership worker did not wake for over 1 s (this process stopped or starved); phi then takes no routed peer out of routing for 1 s";
        unroutable: Counter = "member_unavailable_events", "times a member stopped being available for routing here (SWIM down or unknown, or phi above the threshold)";
        rejoins: Counter = "rejoins", "times this node rejoined under a new identity";
        duplicate_node_id: Gauge = "duplicate_node_id", "1 while another live process with this node id is heard (over the last 5 s) or known alive with a newer identity: stop one of them";
        duplicate_packets: Counter = "duplicate_packets", "gossip packets received from another process with this node id (dropped)";
        identity_reclaims: Counter = "identity_reclaims", "times this process renewed its identity above another, gone, process with its node id";
    }
}

// ---------------------------------------------------------------------------------------------
// The authentication envelope (notes/foca.md §6):
// ver u8 | kind u8 | cluster_tag [8] | generation u64 | ts_ms u64 | id_len u8 | node_id | payload | tag [16]

const ENVELOPE_VERSION: u8 = 1;
const KIND_FOCA: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const TAG_LEN: usize = 16;
const FIXED_LEN: usize = 1 + 1 + 8 + 8 + 8 + 1;
/// Largest datagram we send or accept. foca's own packets are capped below it.
pub const MAX_DATAGRAM: usize = 1400;
/// foca's `max_packet_size`: the datagram minus the envelope (64-byte node ids at most).
const FOCA_MAX_PACKET: usize = MAX_DATAGRAM - FIXED_LEN - 64 - TAG_LEN;
/// Packets whose timestamp is further than this from our clock are dropped as replays. Wide,
/// so that moderately skewed clocks do not partition gossip.
pub const REPLAY_WINDOW_MS: u64 = 120_000;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Short,
    Version,
    Cluster,
    Mac,
    Stale,
    Replayed,
}

/// The most tags `SentTags` keeps (about 5 MiB): more packets sent within the replay window
/// than this (a very large cluster) and the oldest of them are no longer told from another
/// process's.
pub const MAX_SENT_TAGS: usize = 100_000;

/// The authentication tags of the packets this process sent within the replay window (and a
/// few seconds more). A packet with this process's node id and one of these tags is its own,
/// sent back to it (replayed by someone on the network within the window, or looped back),
/// not another live process with its id: without this, a replay of any of its packets from a
/// lower address stopped it, and from a higher one renewed its identity (found in review).
#[derive(Debug, Default)]
pub struct SentTags {
    order: VecDeque<(u64, [u8; TAG_LEN])>,
    set: HashSet<[u8; TAG_LEN]>,
}

impl SentTags {
    /// How long a sent tag is kept: a packet older than the window is rejected as stale anyway.
    const KEEP_MS: u64 = REPLAY_WINDOW_MS + 5_000;

    /// Records the tag of a packet sent at `now_ms`.
    pub fn record(&mut self, now_ms: u64, tag: [u8; TAG_LEN]) {
        while let Some(&(at, old)) = self.order.front() {
            if now_ms.saturating_sub(at) <= Self::KEEP_MS && self.order.len() < MAX_SENT_TAGS {
                break;
            }
            self.order.pop_front();
            self.set.remove(&old);
        }
        if self.set.insert(tag) {
            self.order.push_back((now_ms, tag));
        }
    }

    /// Whether a packet with this tag was sent by this process (within what is kept).
    pub fn sent(&self, tag: &[u8]) -> bool {
        <[u8; TAG_LEN]>::try_from(tag).is_ok_and(|t| self.set.contains(&t))
    }

    /// Tags kept.
    pub fn kept(&self) -> usize {
        self.order.len()
    }
}

struct Envelope {
    key: [u8; 32],
    cluster_tag: [u8; 8],
}

struct Opened<'a> {
    kind: u8,
    generation: u64,
    ts_ms: u64,
    node_id: &'a str,
    payload: &'a [u8],
}

impl Envelope {
    fn new(cluster: &str, secret: &str) -> Envelope {
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
        mac.update(b"ringkv/gossip/v1/");
        mac.update(cluster.as_bytes());
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        let digest = Sha256::digest(cluster.as_bytes());
        let mut cluster_tag = [0u8; 8];
        cluster_tag.copy_from_slice(&digest[..8]);
        Envelope { key, cluster_tag }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    fn seal(&self, kind: u8, me: &RingId, ts_ms: u64, payload: &[u8]) -> Vec<u8> {
        let id = me.node_id.as_bytes();
        let mut out = Vec::with_capacity(FIXED_LEN + id.len() + payload.len() + TAG_LEN);
        out.push(ENVELOPE_VERSION);
        out.push(kind);
        out.extend_from_slice(&self.cluster_tag);
        out.extend_from_slice(&me.generation.to_be_bytes());
        out.extend_from_slice(&ts_ms.to_be_bytes());
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(payload);
        let mut mac = self.mac();
        mac.update(&out);
        let tag = mac.finalize().into_bytes();
        out.extend_from_slice(&tag[..TAG_LEN]);
        out
    }

    fn open<'a>(&self, pkt: &'a [u8], now_ms: u64) -> Result<Opened<'a>, Reject> {
        if pkt.len() < FIXED_LEN + TAG_LEN {
            return Err(Reject::Short);
        }
        if pkt[0] != ENVELOPE_VERSION {
            return Err(Reject::Version);
        }
        if pkt[2..10] != self.cluster_tag {
            return Err(Reject::Cluster);
        }
        let (body, tag) = pkt.split_at(pkt.len() - TAG_LEN);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_truncated_left(tag).map_err(|_| Reject::Mac)?;
        let ts = u64::from_be_bytes(body[18..26].try_into().expect("8-byte slice"));
        if ts.abs_diff(now_ms) > REPLAY_WINDOW_MS {
            return Err(Reject::Stale);
        }
        let id_len = body[26] as usize;
        let id = body.get(27..27 + id_len).ok_or(Reject::Short)?;
        let node_id = std::str::from_utf8(id).map_err(|_| Reject::Short)?;
        Ok(Opened {
            kind: pkt[1],
            generation: u64::from_be_bytes(body[10..18].try_into().expect("8-byte slice")),
            ts_ms: ts,
            node_id,
            payload: &body[27 + id_len..],
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Settings of the gossip layer.
#[derive(Debug, Clone)]
pub struct SwimConfig {
    pub cluster_name: String,
    pub secret: crate::config::Secret,
    /// Gossip addresses to announce to until the node is in contact with the cluster.
    pub seeds: Vec<SocketAddr>,
    pub phi: PhiConfig,
    pub vnodes: u32,
    /// Where the ring (every member's identity and metadata) is saved, so a restarted node routes
    /// with the full ring at once and can find the cluster again (even the original seed).
    pub ring_file: Option<std::path::PathBuf>,
    /// True when this node has no seeds and no saved ring: a cluster of one, ready at once.
    pub lone: bool,
    /// Where the layout is saved; a lone node without one starts a new cluster's layout.
    pub layout_file: Option<std::path::PathBuf>,
    /// Announced in the metadata: the claimant joins this node without `kvctl cluster join`.
    pub auto_join: bool,
    /// Where this process's generation is kept (`save_generation`), renewed ones included.
    pub generation_file: Option<std::path::PathBuf>,
}

/// The generation saved in `path` by a previous process (none if missing or unreadable).
pub fn load_generation(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
}

/// Saves `generation` to `path` durably (a temp file written, fsynced and renamed, then the
/// directory fsynced), so the next process starts above it (`next_generation`).
pub fn save_generation(path: &std::path::Path, generation: u64) -> std::io::Result<()> {
    crate::durable::write_file(path, format!("{generation}\n").as_bytes())
}

/// Reads the saved layout (missing = none; unreadable = an error naming the file).
pub fn load_layout(path: &std::path::Path) -> Result<Option<Layout>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<Layout>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|l| l.check().map(|()| Some(l)))
            .map_err(|e| format!("layout file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("layout file {}: {e}", path.display())),
    }
}

/// Whether `fresh` changes what the ring file says of a member beyond its metadata version:
/// every member republishes its metadata every `META_REPUBLISH` with a new version and nothing
/// else new, and each save is two fsyncs on the gossip task (found in review: about one save
/// a second per node). A file a few versions behind loads the same ring; gossip brings the
/// newest version within seconds.
pub fn saved_content_differs(old: &SavedMember, fresh: &SavedMember) -> bool {
    let mut same_version = old.clone();
    same_version.meta.version = fresh.meta.version;
    same_version != *fresh
}

/// One saved ring member (a line of JSON in the ring file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMember {
    pub id: RingId,
    pub meta: RingMeta,
}

/// Reads the saved ring (missing or unreadable file = none; bad lines are skipped; both said
/// in the log, naming the file: a node that knows no member starts alone).
pub fn load_ring(node_id: &str, path: &std::path::Path) -> Vec<SavedMember> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut members = Vec::new();
            for (i, line) in text.lines().enumerate() {
                match parse_saved_member(line) {
                    Some(m) => members.push(m),
                    None => warn!(node = %node_id, file = %path.display(), line = i + 1,
                                  "saved ring: a line that does not parse is skipped"),
                }
            }
            members
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!(node = %node_id, file = %path.display(), cause = %e,
                  "saved ring unreadable: starting from the seeds only");
            Vec::new()
        }
    }
}

/// One line of the ring file. Lines saved before `synced` and `drained` named a layout by
/// (version, digest) hold plain versions: read as that version with digest 0 (older than any
/// real layout of it, so nothing counts as synced or drained for it), not skipped: skipped, a
/// node started without `--seeds` after the upgrade would know no member and start alone.
fn parse_saved_member(line: &str) -> Option<SavedMember> {
    if let Ok(m) = serde_json::from_str(line) {
        return Some(m);
    }
    let mut v: serde_json::Value = serde_json::from_str(line).ok()?;
    let meta = v.get_mut("meta")?.as_object_mut()?;
    for field in ["synced", "drained"] {
        if let Some(version) = meta.get(field).and_then(serde_json::Value::as_u64) {
            meta.insert(
                field.into(),
                serde_json::json!({"version": version, "digest": 0}),
            );
        }
    }
    serde_json::from_value(v).ok()
}

/// Period of heartbeats to every active member (phi samples).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Announce period while not in contact with the cluster (foca never retries an announce).
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(2);
/// Metadata is re-published this often: dissemination is best effort.
pub const META_REPUBLISH: Duration = Duration::from_secs(5);
/// How often liveness (phi) is re-evaluated for routing.
pub const VIEW_REFRESH: Duration = Duration::from_millis(250);
/// Packets read without waiting each time the membership worker wakes (`read_queued`): a
/// backlog after a hold-up is a few heartbeats and SWIM messages per peer; the bound keeps a
/// flood of packets from starving the timers.
const QUEUED_READS_PER_STEP: usize = 256;

pub enum Command {
    Members(oneshot::Sender<MembersReply>),
    /// Adopt the layout if it supersedes ours and, when an id is given, only while ours is
    /// still that one (a decision made on it must not land on another).
    Adopt(Box<Layout>, Option<LayoutId>, oneshot::Sender<bool>),
    Synced(LayoutId),
    Drained(LayoutId),
    HoldsNothing(bool),
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

/// A process's SWIM generation: its start time in ms, and always above the previous process's
/// (`previous`, persisted in the data dir) even when the clock stepped back since, so the new
/// identity wins the address conflict and its metadata versions (`generation << 20`) stay
/// above the old process's. (With a generation from the clock alone, a node restarted behind
/// its last start was ignored by every peer until the clock caught up.)
pub fn next_generation(previous: Option<u64>, now_ms: u64) -> u64 {
    previous.map_or(now_ms, |p| now_ms.max(p.saturating_add(1)))
}

/// How long another process with this node id must stay silent before this one, the older,
/// takes its identity back (`Driver::after_duplicate`): ten heartbeat periods, so a live
/// duplicate, which hears this process's heartbeats and stops, has long stopped by then.
pub const DUPLICATE_SILENCE: Duration = Duration::from_secs(5);

/// What a process does with an authenticated gossip packet that carries its own node id
/// (`judge_own_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnId {
    /// Not another live process: this process's own address, or a packet sent before this
    /// process started (a previous process of this node, delayed in the network).
    Ignore,
    /// Another process with this node id started before this one: this one stops.
    StopSelf,
    /// Another process with this node id started after this one: it stops when it hears this
    /// one; until then this one keeps serving and says so.
    Incumbent,
}

/// Judges a packet from `from`, sent at `sent_ms` by a process of generation `theirs` that
/// carries this process's node id. `me` is this process's identity and `started_ms` when it
/// started; `superseded` the newest generation it renewed its identity above (`reclaim`; 0
/// if none). Two live processes with one node id shadow each other (every member routes to
/// the newer identity, phi mixes their heartbeats), as Cassandra and Riak refuse: the one
/// with the larger generation (its start time by its own clock; the packet's source address
/// breaks a tie) is the newcomer and stops. A process that renewed above a newcomer has a
/// larger generation than it, but is still the older: a packet of a generation it
/// superseded (one delayed in the network, or the newcomer back from a pause) does not stop
/// it.
pub fn judge_own_id(
    me: &RingId,
    started_ms: u64,
    superseded: u64,
    theirs: u64,
    from: SocketAddr,
    sent_ms: u64,
) -> OwnId {
    if from == me.gossip || sent_ms < started_ms {
        return OwnId::Ignore;
    }
    if theirs <= superseded {
        return OwnId::Incumbent;
    }
    if (theirs, from) < (me.generation, me.gossip) {
        OwnId::StopSelf
    } else {
        OwnId::Incumbent
    }
}

/// Whether this node's layout (`mine`) lets it coordinate: a real layout, at least as new as
/// every member's (`newest_seen`), by version and then digest: of two layouts committed with
/// one version concurrently the greater digest wins, and a node holding the other routes
/// writes by the wrong next ring.
pub fn layout_known(mine: LayoutId, newest_seen: LayoutId) -> bool {
    mine.version > 0 && newest_seen <= mine
}

/// What the older of two processes with one node id does about the other (`reclaim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reclaim {
    /// Another live process with this node id is heard, or known alive with a newer identity
    /// (`gossip.duplicate_node_id`).
    pub alert: bool,
    /// Renew this process's identity above this generation: the newest other identity with
    /// this node id, which every member routes to, belongs to a process that is gone.
    pub renew_above: Option<u64>,
}

/// Judges the other identities with this process's node id: `mine` is its generation,
/// `heard` the newest generation heard directly from another process with its id and whether
/// it was heard within `DUPLICATE_SILENCE`, `others` the identities foca knows with its id at
/// other addresses (generation, down). Renews above the newest of them once none is alive: a
/// duplicate still heard, or known alive, may still be hearing this process and about to stop
/// (renewing then would make this one look newer to it).
pub fn reclaim(mine: u64, heard: Option<(u64, bool)>, others: &[(u64, bool)]) -> Reclaim {
    let recent = heard.is_some_and(|(_, recent)| recent);
    let alive_newer = others.iter().any(|&(g, down)| !down && g >= mine);
    let newest = heard
        .map(|(g, _)| g)
        .into_iter()
        .chain(others.iter().map(|&(g, _)| g))
        .filter(|&g| g >= mine)
        .max();
    Reclaim {
        alert: recent || alive_newer,
        renew_above: newest.filter(|_| !recent && !alive_newer),
    }
}

/// Another live process with this node id, heard by this one (the older).
#[derive(Debug, Clone)]
struct Duplicate {
    generation: u64,
    last_heard: Instant,
    last_logged: Option<Instant>,
    last_answered: Option<Instant>,
}

/// The version of a node's next metadata publication: one more than the last, and at least
/// `generation << 20`, so a restarted process (a larger generation: its start time in ms)
/// publishes above anything its previous process did (it would need 2^20 publications per
/// millisecond of uptime to catch up), and a long-running one never wraps back.
pub fn next_meta_version(previous: u64, generation: u64) -> u64 {
    previous.saturating_add(1).max(generation << 20)
}

/// Whether metadata of version `meta_version` was published by the process behind
/// `generation` (the member's newest identity; `None`: not known to SWIM): that process
/// publishes at or above `generation << 20` (`next_meta_version`). A node's word that it holds
/// nothing counts only from its current process (found in review: a node killed and started
/// again on other data still said so, through its previous process's metadata, until its
/// own arrived; a join of it was accepted meanwhile).
pub fn from_current_process(meta_version: u64, generation: Option<u64>) -> bool {
    generation.is_none_or(|g| meta_version >= g.saturating_mul(1 << 20))
}

/// foca's configuration for ringkv (notes/foca.md §4).
pub fn foca_config() -> foca::Config {
    let mut c = foca::Config::new_lan(NonZeroU32::new(8).expect("non-zero"));
    // The LAN preset gives small clusters 1–3 transmissions, which loses updates.
    c.max_transmissions = NonZeroU8::new(6).expect("non-zero");
    c.max_packet_size = NonZeroUsize::new(FOCA_MAX_PACKET).expect("non-zero");
    // Never forget an address: safe with generations, and avoids resurrecting stale members.
    c.remove_down_after = None;
    // After a partition heals, each side holds the other Down and nobody probes Down members:
    // the preset re-announces to them every 65 s, which kept healed members unroutable for up to
    // ~95 s in the Jepsen runs. Every 2 s to 3 of them heals within seconds (a few packets/s).
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: std::num::NonZeroUsize::new(3).expect("non-zero"),
    });
    c
}

type FocaInstance = Foca<RingId, PostcardCodec, rand::rngs::StdRng, MetaHandler>;

pub struct Driver {
    foca: FocaInstance,
    rt: AccumulatingRuntime<RingId>,
    socket: Arc<UdpSocket>,
    envelope: Envelope,
    /// The tags of the packets sent lately (`SentTags`).
    sent: Mutex<SentTags>,
    /// When restarted members not heard yet were last announced to (`announce_to_unheard`).
    last_unheard_announce: Option<std::time::Instant>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_events: HashMap<u64, Timer<RingId>>,
    timer_seq: u64,
    phi: PhiDetector,
    last_heard: HashMap<String, Instant>,
    meta: MetaTable,
    my_meta: RingMeta,
    active: bool,
    seeds: Vec<SocketAddr>,
    view: watch::Sender<Arc<ClusterView>>,
    stats: Arc<GossipStats>,
    /// The members as `Members` reports them, refreshed with the view (metrics read it).
    pub members_seen: Arc<std::sync::Mutex<Option<MembersReply>>>,
    me: RingId,
    last_reject_log: HashMap<&'static str, Instant>,
    /// The saved ring's writer (`save_ring`).
    ring_file: Option<crate::durable::BackgroundFile>,
    generation_file: Option<std::path::PathBuf>,
    /// Members known from the saved ring (and kept up to date): they stay in the ring while
    /// foca has not (re)discovered them, treated as unavailable.
    saved: BTreeMap<String, SavedMember>,
    lone: bool,
    ready: bool,
    /// Latched: a view published under which this node took data (`NoData::of` said none;
    /// `ClusterView::served`).
    served: bool,
    layout: Arc<Layout>,
    layout_digest: u64,
    layout_file: Option<std::path::PathBuf>,
    /// When this process started (ms since the epoch): packets sent before it are not from a
    /// live duplicate (`judge_own_id`).
    started_ms: u64,
    /// The newest generation of another process with this node id that this one renewed its
    /// identity above (`reclaim`); 0 if none.
    superseded: u64,
    /// Another live process with this node id, heard while this one is the older.
    duplicate: Option<Duplicate>,
    /// A heartbeat ended a suspected peer's silence: the view is published at the next `drain`.
    view_stale: bool,
    /// Until when phi takes no peer out of routing: this process was held up (stopped,
    /// starved) and its peers' silence, measured by its own clock, says nothing yet
    /// (`note_local_pause`).
    pause_grace_until: Option<std::time::Instant>,
    /// Why this process must stop (an older live process has its node id); the worker then
    /// cancels the node's shutdown token and `node::run` returns it as its error.
    pub fatal: Arc<Mutex<Option<String>>>,
}

impl Driver {
    pub fn new(
        me: RingId,
        cfg: SwimConfig,
        socket: UdpSocket,
        view: watch::Sender<Arc<ClusterView>>,
        stats: Arc<GossipStats>,
    ) -> Driver {
        let meta: MetaTable = Arc::new(Mutex::new(BTreeMap::new()));
        let me_id = me.node_id.clone();
        let foca = Foca::with_custom_broadcast(
            me.clone(),
            foca_config(),
            rand::make_rng::<rand::rngs::StdRng>(),
            PostcardCodec,
            MetaHandler {
                table: meta.clone(),
            },
        );
        let my_meta = RingMeta {
            node_id: me.node_id.clone(),
            // The first publication raises it to `generation << 20`.
            version: 0,
            status: RingStatus::Joining,
            vnodes: cfg.vnodes,
            layout_version: 0,
            layout_digest: 0,
            synced: LayoutId::default(),
            auto_join: cfg.auto_join,
            drained: LayoutId::default(),
            holds_nothing: false,
        };
        // A saved layout, else (a new cluster's first node) a layout of this node alone.
        let saved_layout = cfg.layout_file.as_deref().map(load_layout);
        let layout = match saved_layout {
            Some(Ok(Some(l))) => l,
            Some(Err(e)) => {
                error!(node = %me_id, error = %e, "the saved layout is unreadable; waiting for the cluster's");
                Layout::default()
            }
            _ if cfg.lone => {
                info!(node = %me_id, "no seeds and no saved layout: starting a new cluster with this node as its only owner");
                Layout::bootstrap(&me_id, cfg.vnodes)
            }
            _ => Layout::default(),
        };
        Driver {
            foca,
            rt: AccumulatingRuntime::new(),
            socket: Arc::new(socket),
            envelope: Envelope::new(&cfg.cluster_name, cfg.secret.expose()),
            sent: Mutex::default(),
            last_unheard_announce: None,
            timers: BinaryHeap::new(),
            timer_events: HashMap::new(),
            timer_seq: 0,
            phi: PhiDetector::new(cfg.phi),
            last_heard: HashMap::new(),
            meta,
            my_meta,
            active: false,
            seeds: cfg.seeds,
            view,
            stats,
            members_seen: Default::default(),
            me,
            last_reject_log: HashMap::new(),
            saved: cfg
                .ring_file
                .as_deref()
                .map(|path| load_ring(&me_id, path))
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m.id.node_id != me_id)
                .map(|m| (m.id.node_id.clone(), m))
                .collect(),
            ring_file: cfg.ring_file.and_then(|path| {
                let node = me_id.clone();
                let file = crate::durable::BackgroundFile::new(path.clone(), move |path, e| {
                    warn!(node = %node, file = %path.display(), error = %e, "could not save the ring");
                });
                match file {
                    Ok(f) => Some(f),
                    Err(e) => {
                        error!(node = %me_id, file = %path.display(), error = %e,
                               "could not start the ring file's writer thread: the ring is not saved");
                        None
                    }
                }
            }),
            generation_file: cfg.generation_file,
            lone: cfg.lone,
            ready: false,
            served: false,
            layout_digest: layout.digest(),
            layout: Arc::new(layout),
            layout_file: cfg.layout_file,
            started_ms: now_ms(),
            superseded: 0,
            duplicate: None,
            view_stale: false,
            pause_grace_until: None,
            fatal: Default::default(),
        }
    }

    /// Saves the layout (atomically and durably: `durable::write_file`); an error is logged
    /// (the layout is re-fetched from peers after a restart if it was not saved).
    fn save_layout(&self) {
        let Some(path) = &self.layout_file else {
            return;
        };
        let bytes = serde_json::to_vec_pretty(&*self.layout).expect("a layout serializes");
        if let Err(e) = crate::durable::write_file(path, &bytes) {
            error!(node = %self.me.node_id, file = %path.display(), error = %e, "could not save the layout");
        }
    }

    /// Adopts `layout` if it supersedes ours; true if it did.
    fn adopt(&mut self, layout: Layout) -> bool {
        if !layout.supersedes(&self.layout) {
            return false;
        }
        info!(node = %self.me.node_id, from = self.layout.version, to = layout.version,
              owners = layout.current.len(), transition = layout.next.is_some(), "new layout");
        self.layout_digest = layout.digest();
        self.layout = Arc::new(layout);
        self.save_layout();
        self.publish_meta(self.my_meta.status);
        self.publish_view();
        true
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The layout this node holds, as (version, digest).
    fn layout_id(&self) -> LayoutId {
        LayoutId {
            version: self.layout.version,
            digest: self.layout_digest,
        }
    }

    /// The driver as a background worker: each step handles one event (a packet, a timer, a
    /// command). `leave` is the node's shutdown signal: on it the driver tells the cluster it
    /// is leaving (so peers stop routing here at once, while requests drain) and stops.
    pub fn into_worker(
        self,
        commands: mpsc::Receiver<Command>,
        leave: CancellationToken,
    ) -> MembershipWorker {
        let interval = |period| {
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        MembershipWorker {
            driver: self,
            commands,
            leave,
            started: false,
            buf: vec![0u8; MAX_DATAGRAM + 1],
            heartbeat: interval(HEARTBEAT_INTERVAL),
            announce: interval(ANNOUNCE_INTERVAL),
            republish: interval(META_REPUBLISH),
            refresh: interval(VIEW_REFRESH),
            last_woke: Instant::now(),
        }
    }

    fn send(&self, kind: u8, to: SocketAddr, payload: &[u8]) {
        let now = now_ms();
        let pkt = self.envelope.seal(kind, &self.me, now, payload);
        let tag: [u8; TAG_LEN] = pkt[pkt.len() - TAG_LEN..]
            .try_into()
            .expect("a sealed packet ends with its tag");
        self.sent
            .lock()
            .expect("sent tags lock poisoned")
            .record(now, tag);
        // Gossip is best effort: a full socket buffer drops the packet (SWIM tolerates loss).
        if self.socket.try_send_to(&pkt, to).is_ok() {
            self.stats.packets_out.inc();
        }
    }

    fn reject(&mut self, why: Reject, from: SocketAddr) {
        let (counter, name) = match why {
            Reject::Short => (&self.stats.rejected_short, "truncated or malformed"),
            Reject::Version => (&self.stats.rejected_version, "unknown envelope version"),
            Reject::Cluster => (&self.stats.rejected_cluster, "another cluster name"),
            Reject::Mac => (
                &self.stats.rejected_mac,
                "bad authentication tag (wrong secret?)",
            ),
            Reject::Stale => (
                &self.stats.rejected_stale,
                "timestamp outside the replay window",
            ),
            Reject::Replayed => (
                &self.stats.rejected_replayed,
                "one of this process's own packets, sent back to it (replayed)",
            ),
        };
        counter.inc();
        // One line per reason per 10 s: a misconfigured node must not flood the log.
        let now = Instant::now();
        let due = self
            .last_reject_log
            .get(name)
            .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(10));
        if due {
            self.last_reject_log.insert(name, now);
            warn!(node = %self.me.node_id, %from, reason = name, "rejected gossip packet");
        }
    }

    /// A packet read from the socket; `waited`: the worker was waiting for it, so it arrived
    /// now (else it was read in a backlog, `read_queued`, and its arrival time is unknown).
    fn on_packet(&mut self, pkt: &[u8], from: SocketAddr, waited: bool) {
        if pkt.len() > MAX_DATAGRAM {
            return self.reject(Reject::Short, from);
        }
        let (kind, node_id, payload) = match self.envelope.open(pkt, now_ms()) {
            Ok(o) if o.node_id == self.me.node_id => {
                let own = self
                    .sent
                    .lock()
                    .expect("sent tags lock poisoned")
                    .sent(&pkt[pkt.len() - TAG_LEN..]);
                if own {
                    return self.reject(Reject::Replayed, from);
                }
                return self.on_own_id(o.generation, o.ts_ms, from);
            }
            Ok(o) => (o.kind, o.node_id.to_string(), o.payload.to_vec()),
            Err(why) => return self.reject(why, from),
        };
        self.stats.packets_in.inc();
        let now = Instant::now();
        self.last_heard.insert(node_id.clone(), now);
        match kind {
            KIND_HEARTBEAT => {
                self.stats.heartbeats_in.inc();
                let was_suspected = self.phi.is_suspected(&node_id, now.into_std());
                if waited {
                    self.phi.heartbeat(&node_id, now.into_std());
                } else {
                    self.phi.heartbeat_from_backlog(&node_id, now.into_std());
                }
                // Back from a silence: routable again at the end of this batch of packets (`drain`),
                // not at the next refresh. Not at once: judged in the middle of a backlog, the
                // peers whose heartbeats are further on in it would look silent.
                self.view_stale |= was_suspected;
            }
            KIND_FOCA => {
                if let Err(e) = self.foca.handle_data(&payload, &mut self.rt) {
                    self.stats.foca_errors.inc();
                    debug!(node = %self.me.node_id, %from, error = %e, "foca rejected a packet");
                }
            }
            other => {
                debug!(node = %self.me.node_id, %from, kind = other, "unknown gossip packet kind")
            }
        }
    }

    /// A packet from `from` that carries this node's id: another live process with it, or
    /// nothing to see (`judge_own_id`). Its packets are dropped either way: it is not a peer.
    fn on_own_id(&mut self, theirs: u64, sent_ms: u64, from: SocketAddr) {
        let verdict = judge_own_id(
            &self.me,
            self.started_ms,
            self.superseded,
            theirs,
            from,
            sent_ms,
        );
        if verdict == OwnId::Ignore {
            return;
        }
        self.stats.duplicate_packets.inc();
        self.stats.duplicate_node_id.set(1);
        let me = &self.me;
        if verdict == OwnId::StopSelf {
            let mut fatal = self.fatal.lock().expect("fatal slot lock poisoned");
            if fatal.is_none() {
                let why = format!(
                    "node {}: another live process has this node id, at gossip address {from} \
                     (generation {theirs}, started before this one, generation {}); stopping \
                     this one. Two processes with one node id shadow each other: give this \
                     one its own --node-id, or stop the other first (a node moved to a new \
                     address: stop its old process before starting the new one)",
                    me.node_id, me.generation
                );
                error!(node = %me.node_id, other_gossip = %from, other_generation = theirs,
                       generation = me.generation, "{why}");
                *fatal = Some(why);
            }
            return;
        }
        let now = Instant::now();
        let dup = self.duplicate.get_or_insert(Duplicate {
            generation: theirs,
            last_heard: now,
            last_logged: None,
            last_answered: None,
        });
        dup.generation = dup.generation.max(theirs);
        dup.last_heard = now;
        // One line per 10 s: the newer process stops as soon as it hears this one, so more
        // than one line means it runs a version that does not.
        if dup
            .last_logged
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            dup.last_logged = Some(now);
            error!(node = %me.node_id, other_gossip = %from, other_generation = theirs,
                   generation = me.generation,
                   "another live process has this node id (started after this one); it should \
                    stop when it hears this one. Until it does, the cluster routes this node's \
                    requests to it: stop it, or give it its own --node-id");
        }
        // Answer it directly, at most once a second (two processes that each take the other
        // for the newcomer must not answer each other's answers without end): it may know this
        // process only from this packet (its only seed was this process's address, whose
        // packets this process drops), and it stops when it hears an older process with its id.
        if dup
            .last_answered
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            dup.last_answered = Some(now);
            self.send(KIND_HEARTBEAT, from, &[]);
        }
    }

    /// Takes this node's place back once another process with its id is gone (`reclaim`):
    /// every member routes to the newest identity of a node id, so while a stopped duplicate's
    /// identity is newer than this one's, the cluster routes this node's requests to a process
    /// that is gone. This process then renews its own identity above it (a new generation: its
    /// identity and metadata win again). Also keeps `gossip.duplicate_node_id` up to date.
    fn after_duplicate(&mut self) {
        let others = self.own_id_elsewhere();
        let heard = self
            .duplicate
            .as_ref()
            .map(|d| (d.generation, d.last_heard.elapsed() < DUPLICATE_SILENCE));
        let verdict = reclaim(self.me.generation, heard, &others);
        self.stats.duplicate_node_id.set(u64::from(verdict.alert));
        if heard.is_some_and(|(_, recent)| !recent) {
            self.duplicate = None;
        }
        let Some(above) = verdict.renew_above else {
            return;
        };
        let new = RingId {
            generation: above + 1,
            ..self.me.clone()
        };
        if let Err(e) = self.foca.change_identity(new.clone(), &mut self.rt) {
            error!(node = %new.node_id, error = %e,
                   "could not renew this node's identity after another process with its id stopped; restart this process");
            return;
        }
        if let Some(path) = &self.generation_file {
            if let Err(e) = save_generation(path, new.generation) {
                warn!(node = %new.node_id, file = %path.display(), error = %e,
                      "could not save the renewed generation; the next start may begin below it");
            }
        }
        self.stats.identity_reclaims.inc();
        self.superseded = self.superseded.max(above);
        warn!(node = %new.node_id, other_generation = above, generation = new.generation,
              "another process with this node id is gone (silent, or down for the cluster); \
               renewed this one's identity so the cluster routes to it again");
        self.me = new;
        self.publish_meta(self.my_meta.status);
        self.publish_view();
    }

    /// The identities foca knows with this node id at other addresses, as (generation, down):
    /// previous processes of this node elsewhere, or other live processes with its id.
    fn own_id_elsewhere(&self) -> Vec<(u64, bool)> {
        self.foca
            .iter_membership_state()
            .filter(|m| m.id().node_id == self.me.node_id && m.id().gossip != self.me.gossip)
            .map(|m| (m.id().generation, m.state() == State::Down))
            .collect()
    }

    /// Reads the packets already queued in the socket (at most `QUEUED_READS_PER_STEP`),
    /// without waiting. Called before anything that judges the peers (a timer, a view
    /// refresh): after the worker was held up, the heartbeats its peers sent meanwhile sit
    /// unread, and judged without them a live peer looks silent and is published unavailable.
    fn read_queued(&mut self, buf: &mut [u8]) {
        for _ in 0..QUEUED_READS_PER_STEP {
            match self.socket.try_recv_from(buf) {
                Ok((len, from)) => self.on_packet(&buf[..len], from, false),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(node = %self.me.node_id, error = %e, "gossip recv failed");
                    return;
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        // All due timers, earliest first (foca relies on their order, notes §8).
        let mut due = Vec::new();
        while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(t) = self.timer_events.remove(&seq) {
                due.push(t);
            }
        }
        for timer in due {
            if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
                self.stats.foca_errors.inc();
                debug!(node = %self.me.node_id, error = %e, "foca timer");
            }
        }
    }

    fn send_heartbeats(&mut self) {
        let targets: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().gossip).collect();
        for to in targets {
            self.send(KIND_HEARTBEAT, to, &[]);
        }
        self.announce_to_unheard();
    }

    fn announce_to(&mut self, id: RingId) {
        if let Err(e) = self.foca.announce(id, &mut self.rt) {
            debug!(node = %self.me.node_id, error = %e, "announce to a member failed");
        }
    }

    /// Restarted or joined members not heard since (`PhiDetector::restarted`, `joined`) get an announcement every
    /// `ANNOUNCE_INTERVAL` until their first heartbeat: they heartbeat only the members their
    /// foca knows, and one lost announcement would leave this node unknown to them until a
    /// probe or a gossip round brings it, past the grace in a large cluster.
    fn announce_to_unheard(&mut self) {
        let now = std::time::Instant::now();
        if self
            .last_unheard_announce
            .is_some_and(|t| now.duration_since(t) < ANNOUNCE_INTERVAL)
        {
            return;
        }
        let unheard = self.phi.unheard();
        if unheard.is_empty() {
            return;
        }
        self.last_unheard_announce = Some(now);
        let targets: Vec<RingId> = self
            .foca
            .iter_members()
            .map(|m| m.id().clone())
            .filter(|id| unheard.contains(&id.node_id))
            .collect();
        for id in targets {
            self.announce_to(id);
        }
    }

    fn announce_to_seeds(&mut self) {
        for seed in self.seeds.clone() {
            if seed == self.me.gossip {
                continue;
            }
            // A placeholder identity: foca only needs the seed's address to reach it.
            let dst = RingId {
                node_id: String::new(),
                gossip: seed,
                peer: seed,
                client: seed,
                generation: 0,
            };
            if let Err(e) = self.foca.announce(dst, &mut self.rt) {
                debug!(node = %self.me.node_id, %seed, error = %e, "announce failed");
            }
        }
    }

    /// Applies `change` to this node's metadata; when it says something changed, gossips
    /// the new metadata and publishes the view.
    fn update_meta(&mut self, change: impl FnOnce(&mut RingMeta) -> bool) {
        if change(&mut self.my_meta) {
            self.publish_meta(self.my_meta.status);
            self.publish_view();
        }
    }

    fn publish_meta(&mut self, status: RingStatus) {
        self.my_meta.status = status;
        self.my_meta.layout_version = self.layout.version;
        self.my_meta.layout_digest = self.layout_digest;
        self.my_meta.version = next_meta_version(self.my_meta.version, self.me.generation);
        let bytes = postcard::to_allocvec(&self.my_meta).expect("ring metadata serializes");
        if let Err(e) = self.foca.add_broadcast(&bytes) {
            error!(node = %self.me.node_id, error = %e, "could not broadcast ring metadata");
        }
    }

    /// Moves foca's outputs out: packets to the socket, timers to the heap, notifications to
    /// the view and the phi detector.
    fn drain(&mut self) {
        let mut changed = false;
        loop {
            let mut progressed = false;
            while let Some((dst, data)) = self.rt.to_send() {
                progressed = true;
                self.send(KIND_FOCA, dst.gossip, &data);
            }
            while let Some((after, timer)) = self.rt.to_schedule() {
                progressed = true;
                self.timer_seq += 1;
                self.timers
                    .push(Reverse((Instant::now() + after, self.timer_seq)));
                self.timer_events.insert(self.timer_seq, timer);
            }
            while let Some(n) = self.rt.to_notify() {
                progressed = true;
                changed = true;
                self.on_notification(n);
            }
            if !progressed {
                break;
            }
        }
        if changed || std::mem::take(&mut self.view_stale) {
            self.publish_view();
        }
    }

    fn on_notification(&mut self, n: OwnedNotification<RingId>) {
        let me = self.me.node_id.clone();
        match n {
            OwnedNotification::MemberUp(id) => {
                info!(node = %me, member = %id.node_id, generation = id.generation, gossip = %id.gossip, "member up");
                // Its silence counts after a grace unless it was heard already
                // (`PhiDetector::joined`), and this node announces to it (again every 2 s
                // while it is unheard), so it knows this node and heartbeats it. A node that
                // restarted at another address (its old identity still known here) is a
                // restart: the old process's history says nothing of the new one (found in
                // review: judged on it, the new process was suspected at once). An identity
                // of this very node (an older process) is never heard: no history for it.
                if id.node_id != me {
                    let now = std::time::Instant::now();
                    let moved = self
                        .foca
                        .iter_membership_state()
                        .any(|m| m.id().node_id == id.node_id && *m.id() != id);
                    if moved {
                        self.phi.restarted(&id.node_id, now);
                    } else {
                        self.phi.joined(&id.node_id, now);
                    }
                    self.announce_to(id.clone());
                }
                // A (re)joining member needs everyone's metadata to build the ring: send ours
                // again now rather than at the next periodic republication.
                self.publish_meta(self.my_meta.status);
            }
            OwnedNotification::MemberDown(id) => {
                self.stats.members_down.inc();
                // The history belongs to the node id, which a live identity of the same node
                // (a restart at another address whose old identity goes down later) still
                // has: before (found in review), its history was wiped here.
                if !self
                    .foca
                    .iter_members()
                    .any(|m| m.id().node_id == id.node_id)
                {
                    self.phi.remove(&id.node_id);
                }
                warn!(node = %me, member = %id.node_id, generation = id.generation, "member down (SWIM)");
            }
            OwnedNotification::Rename(old, new) => {
                // A restart: the old process's history says nothing about the new one, whose
                // silence counts after a grace (`PhiDetector::restarted`). Announcing to it
                // (again every 2 s until it is heard: `announce_to_unheard`) makes it know
                // this node and heartbeat it, whatever its own announcements reached.
                self.phi.remove(&old.node_id);
                // Only for a live new identity: one already down (a crash loop heard of late)
                // would keep an unheard history that nothing removes.
                if self.foca.iter_members().any(|m| *m.id() == new) {
                    self.phi.restarted(&new.node_id, std::time::Instant::now());
                    self.announce_to(new.clone());
                }
                self.publish_meta(self.my_meta.status);
                info!(node = %me, member = %new.node_id, old_generation = old.generation,
                      generation = new.generation, "member restarted (new identity)");
            }
            OwnedNotification::Active => {
                info!(node = %me, "in contact with the cluster");
                self.active = true;
                if self.my_meta.status == RingStatus::Joining {
                    self.publish_meta(RingStatus::Normal);
                }
            }
            OwnedNotification::Idle => {
                warn!(node = %me, "no active members left; announcing to seeds again");
                self.active = false;
            }
            OwnedNotification::Defunct => {
                warn!(node = %me, "declared down by the cluster; rejoining");
                self.active = false;
            }
            OwnedNotification::Rejoin(new) => {
                self.stats.rejoins.inc();
                info!(node = %me, generation = new.generation, "rejoined the cluster with a new identity");
                if let Some(path) = &self.generation_file {
                    if let Err(e) = save_generation(path, new.generation) {
                        warn!(node = %me, file = %path.display(), error = %e,
                              "could not save the renewed generation; the next start may begin below it");
                    }
                }
                self.me = new;
            }
        }
    }

    /// The newest identity and state per node id (foca keys members by address).
    fn latest_members(&self) -> BTreeMap<String, (RingId, State, u16)> {
        let mut out: BTreeMap<String, (RingId, State, u16)> = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            if id.node_id.is_empty() || id.node_id == self.me.node_id {
                continue;
            }
            let newer = out
                .get(&id.node_id)
                .is_none_or(|(old, _, _)| id.generation > old.generation);
            if newer {
                out.insert(id.node_id.clone(), (id.clone(), m.state(), m.incarnation()));
            }
        }
        out
    }

    fn member_info(&self, id: &RingId, vnodes: u32) -> MemberInfo {
        MemberInfo {
            node_id: id.node_id.clone(),
            client_addr: id.client.to_string(),
            peer_addr: id.peer.to_string(),
            vnodes,
            generation: id.generation,
        }
    }

    /// Routable: not down for SWIM, and not suspected by phi, except that during the grace
    /// after this process was held up (`note_local_pause`) phi takes no routed peer out.
    fn is_available(
        &self,
        node_id: &str,
        state: State,
        now: std::time::Instant,
        routed: bool,
    ) -> bool {
        let in_grace = self.pause_grace_until.is_some_and(|t| now < t);
        state != State::Down && ((in_grace && routed) || !self.phi.is_suspected(node_id, now))
    }

    /// This worker did not wake for `gap` (more than `PhiConfig::local_pause`): the process
    /// was stopped or starved, and phi takes no routed peer out for `PhiConfig::pause_grace`
    /// (SWIM still declares the dead down).
    fn note_local_pause(&mut self, gap: Duration) {
        self.stats.local_pauses.inc();
        let grace = self.phi.config().pause_grace;
        self.pause_grace_until = Some(std::time::Instant::now() + grace);
        warn!(node = %self.me.node_id, paused_ms = gap.as_millis() as u64,
              grace_ms = grace.as_millis() as u64,
              "the membership worker was held up (process stopped or starved): phi takes no peer out of routing until its heartbeats had time to arrive");
    }

    /// Rebuilds the cluster view and publishes it if anything routing-relevant changed.
    fn publish_view(&mut self) {
        let now = std::time::Instant::now();
        let meta = self.meta.lock().expect("meta table lock poisoned").clone();
        let foca_members = self.latest_members();
        // Learn into the saved ring: the newest identity and metadata of every member.
        let mut ring_changed = false;
        for (node_id, (id, _, _)) in &foca_members {
            let Some(m) = meta.get(node_id) else { continue };
            let fresh = SavedMember {
                id: id.clone(),
                meta: m.clone(),
            };
            let old = self.saved.get(node_id);
            let newer = old.is_none_or(|old| {
                (old.id.generation, old.meta.version) < (fresh.id.generation, fresh.meta.version)
            });
            if newer {
                ring_changed |= old.is_none_or(|old| saved_content_differs(old, &fresh));
                self.saved.insert(node_id.clone(), fresh);
            }
        }
        if ring_changed {
            self.save_ring();
        }
        let mut members = BTreeMap::new();
        let mut alive = std::collections::BTreeSet::new();
        let me: NodeId = self.me.node_id.as_str().into();
        let layout = self.layout.clone();
        members.insert(me.clone(), self.member_info(&self.me, self.my_meta.vnodes));
        let mut seen = BTreeMap::new();
        // The view published last: who is routed now (`is_available`), and what to compare with.
        let current = self.view.borrow().clone();
        for (node_id, saved) in &self.saved {
            let nid: NodeId = node_id.as_str().into();
            // Routing uses a member only while foca knows it alive and phi is low; a member
            // known only from the saved ring is unavailable until foca rediscovers it.
            if let Some((id, state, _)) = foca_members.get(node_id) {
                if id.generation >= saved.id.generation
                    && self.is_available(
                        node_id,
                        *state,
                        now,
                        current.alive.contains(node_id.as_str()),
                    )
                {
                    alive.insert(nid.clone());
                }
            }
            if let Some(m) = meta.get(node_id) {
                let generation = foca_members.get(node_id).map(|(id, _, _)| id.generation);
                seen.insert(
                    nid.clone(),
                    LayoutSeen {
                        version: m.layout_version,
                        digest: m.layout_digest,
                        synced: m.synced,
                        auto_join: m.auto_join,
                        drained: m.drained,
                        holds_nothing: m.holds_nothing
                            && from_current_process(m.version, generation),
                    },
                );
            }
            members.insert(nid, self.member_info(&saved.id, saved.meta.vnodes));
        }
        seen.insert(
            me.clone(),
            LayoutSeen {
                version: layout.version,
                digest: self.layout_digest,
                synced: self.my_meta.synced,
                auto_join: self.my_meta.auto_join,
                drained: self.my_meta.drained,
                holds_nothing: self.my_meta.holds_nothing,
            },
        );
        // Ready to coordinate once the ring is known *as of now*: a cluster of one, or in
        // contact with the cluster and holding metadata received in this run for every member
        // foca reports up, and a layout at least as new as every member's. A saved ring alone
        // is not enough: members may have joined, left or changed while this node was down, and
        // coordinating with a stale ring stores keys on the wrong replicas. (The saved ring
        // still routes: its members stay in the ring.)
        let complete = foca_members
            .iter()
            .all(|(id, (_, state, _))| *state == State::Down || meta.contains_key(id));
        let newest_seen = seen.values().map(LayoutSeen::layout).max();
        let has_layout = layout_known(self.layout_id(), newest_seen.unwrap_or_default());
        // Another identity with this node id that foca does not know down: a previous process
        // of this node at another address, not yet found dead, or a live duplicate (which,
        // when it is older, this process will hear and stop for). Serving under the same id
        // meanwhile would take data the other may still be taking.
        let shadow = self.own_id_elsewhere().iter().any(|&(_, down)| !down);
        // Latched: once the ring is known, a newcomer whose metadata is still in flight simply
        // is not in the ring yet, and a layout committed elsewhere arrives within a gossip
        // round; neither must stop this node from serving.
        self.ready |= has_layout && !shadow && (self.lone || (self.active && complete));
        let ready = self.ready;
        self.served |= NoData::of(ready, layout.retired.contains(&*me)).is_none();
        let served = self.served;
        let epoch = self.layout_digest;
        if current.members == members
            && current.alive == alive
            && current.epoch == epoch
            && current.ready == ready
            && current.served == served
            && current.seen == seen
        {
            return;
        }
        self.log_routing_changes(&current.alive, &alive, &foca_members, now);
        let (ring, next) = if current.epoch == epoch && current.layout.version == layout.version {
            (current.ring.clone(), current.next.clone())
        } else {
            (layout.current_ring(), layout.next_ring())
        };
        self.view.send_replace(Arc::new(ClusterView {
            me,
            members,
            ring,
            next,
            layout,
            seen,
            alive,
            version: current.version + 1,
            epoch,
            ready,
            served,
        }));
    }

    /// Says which members this node stops or starts routing to, and why: a peer taken out of
    /// routing refuses or diverts every request that needed it, and without a line an operator
    /// cannot tell a dead peer from a slow one or from this node's own stall.
    fn log_routing_changes(
        &self,
        was: &std::collections::BTreeSet<NodeId>,
        now_alive: &std::collections::BTreeSet<NodeId>,
        foca_members: &BTreeMap<String, (RingId, State, u16)>,
        now: std::time::Instant,
    ) {
        let me = &self.me.node_id;
        for gone in was.difference(now_alive) {
            self.stats.unroutable.inc();
            let member: &str = gone;
            let swim = foca_members.get(member).map_or("unknown", |(_, state, _)| {
                SWIM_STATE_NAMES[swim_code(*state) as usize]
            });
            // None: no history (SWIM declared it down, which drops it, or it was never heard).
            let phi = self
                .phi
                .phi(member, now)
                .map_or_else(|| "none".to_string(), |p| format!("{p:.1}"));
            let silent_ms = self
                .last_heard
                .get(member)
                .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64);
            warn!(node = %me, member, swim, %phi, threshold = self.phi.config().threshold,
                  silent_ms, "member unavailable for routing");
        }
        for back in now_alive.difference(was) {
            let member: &str = back;
            info!(node = %me, member, "member available for routing");
        }
    }

    /// Saves the ring (best effort): one JSON line per member, written atomically and durably
    /// on the ring file's own thread (`durable::BackgroundFile`), not on this task.
    fn save_ring(&self) {
        let Some(file) = &self.ring_file else {
            return;
        };
        let text: String = self
            .saved
            .values()
            .filter_map(|m| serde_json::to_string(m).ok())
            .map(|l| l + "\n")
            .collect();
        file.submit(text.into_bytes());
    }

    fn members_reply(&self) -> MembersReply {
        let now = Instant::now();
        let meta = self.meta.lock().expect("meta table lock poisoned").clone();
        let view = self.view.borrow().clone();
        let role = |node: &str| ring_role(&self.layout, node).code();
        let status_of = |node: &str| meta.get(node).map(|m| (role(node), m.vnodes));
        let mut members = vec![MemberStatus {
            node_id: self.me.node_id.clone(),
            client_addr: self.me.client.to_string(),
            peer_addr: self.me.peer.to_string(),
            gossip_addr: self.me.gossip.to_string(),
            swim_state: 0,
            incarnation: 0,
            generation: self.me.generation,
            phi_milli: 0,
            last_heard_ms: 0,
            ring_status: role(&self.me.node_id),
            vnodes: self.my_meta.vnodes,
            available: true,
            is_self: true,
        }];
        let foca_members = self.latest_members();
        for (node_id, saved) in &self.saved {
            if foca_members.contains_key(node_id) {
                continue;
            }
            // Known from the saved ring only: not (yet) heard of by SWIM.
            members.push(MemberStatus {
                node_id: node_id.clone(),
                client_addr: saved.id.client.to_string(),
                peer_addr: saved.id.peer.to_string(),
                gossip_addr: saved.id.gossip.to_string(),
                swim_state: 2,
                incarnation: 0,
                generation: saved.id.generation,
                phi_milli: u32::MAX,
                last_heard_ms: u64::MAX,
                ring_status: role(node_id),
                vnodes: saved.meta.vnodes,
                available: false,
                is_self: false,
            });
        }
        for (node_id, (id, state, incarnation)) in foca_members {
            let (ring_status, vnodes) = status_of(&node_id)
                .or_else(|| {
                    self.saved
                        .get(&node_id)
                        .map(|m| (role(&node_id), m.meta.vnodes))
                })
                .unwrap_or((255, 0));

            let phi = self.phi.phi(&node_id, now.into_std());
            members.push(MemberStatus {
                client_addr: id.client.to_string(),
                peer_addr: id.peer.to_string(),
                gossip_addr: id.gossip.to_string(),
                swim_state: swim_code(state),
                incarnation: incarnation as u32,
                generation: id.generation,
                phi_milli: phi.map_or(u32::MAX, |p| {
                    (p * 1000.0).clamp(0.0, (u32::MAX - 1) as f64) as u32
                }),
                last_heard_ms: self
                    .last_heard
                    .get(&node_id)
                    .map_or(u64::MAX, |t| now.duration_since(*t).as_millis() as u64),
                ring_status,
                vnodes,
                available: view.alive.contains(node_id.as_str()),
                is_self: false,
                node_id,
            });
        }
        MembersReply {
            phi_threshold_milli: (self.phi.config().threshold * 1000.0) as u32,
            members,
        }
    }
}

/// A SWIM state as `MemberStatus::swim_state` codes it (an index of `SWIM_STATE_NAMES`).
fn swim_code(state: State) -> u8 {
    match state {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    }
}

/// A node's place in the layout: an owner (normal), an owner leaving at the running
/// transition's switch, a node that owns nothing yet or only after the switch (joining), or
/// one a completed plan took out (removed).
pub fn ring_role(layout: &Layout, node: &str) -> RingStatus {
    let in_next = layout.next.as_ref().map(|n| n.contains_key(node));
    if layout.retired.contains(node) {
        RingStatus::Removed
    } else if layout.current.contains_key(node) {
        if in_next == Some(false) {
            RingStatus::Leaving
        } else {
            RingStatus::Normal
        }
    } else {
        RingStatus::Joining
    }
}

/// Whether `m` counts among the cluster's members in the metrics (`cluster.members`,
/// `cluster.members_by_state`): not a node a completed plan retired, and, while down, only one
/// that owns ranges now or after the running change. A down node outside the layout (removed,
/// or started and gone before any plan took it in) makes nothing unavailable, and no command
/// clears it from the saved ring: counted, it would hold a "member down" alert forever.
pub fn counted_member(layout: &Layout, m: &MemberStatus) -> bool {
    match ring_role(layout, &m.node_id) {
        RingStatus::Removed => false,
        RingStatus::Normal | RingStatus::Leaving => true,
        RingStatus::Joining => {
            m.swim_state_name() != "down"
                || layout
                    .next
                    .as_ref()
                    .is_some_and(|n| n.contains_key(&m.node_id))
        }
    }
}

/// How long `kvctl members` keeps listing a node that never joined the ring (no owner now or
/// after the running change, not retired) once SWIM holds it down, counted from when this node
/// last heard it. Such a node makes nothing unavailable and no command clears it from the saved
/// ring; Cassandra likewise drops a gossip member that owns no tokens 30 s after it went
/// silent. It is listed again as soon as it is back.
pub const LIST_GONE_OUTSIDER_FOR: Duration = Duration::from_secs(30);

/// Whether `kvctl members` leaves `m` out: a node that never joined the ring, down, and
/// silent for `LIST_GONE_OUTSIDER_FOR` or more (or never heard by this process).
pub fn gone_outsider(layout: &Layout, m: &MemberStatus) -> bool {
    !m.is_self
        && ring_role(layout, &m.node_id) == RingStatus::Joining
        && !counted_member(layout, m)
        && m.last_heard_ms >= LIST_GONE_OUTSIDER_FOR.as_millis() as u64
}

/// The SWIM/phi driver on the worker runner (`Driver::into_worker`).
pub struct MembershipWorker {
    driver: Driver,
    commands: mpsc::Receiver<Command>,
    leave: CancellationToken,
    started: bool,
    buf: Vec<u8>,
    heartbeat: tokio::time::Interval,
    announce: tokio::time::Interval,
    republish: tokio::time::Interval,
    refresh: tokio::time::Interval,
    /// When the worker last woke from its wait (`PhiConfig::local_pause`: it wakes at least
    /// every `VIEW_REFRESH`).
    last_woke: Instant,
}

impl MembershipWorker {
    /// Another live process has this node id (`on_own_id`): leaves, and `node::run` returns
    /// the reason as its error once everything stopped.
    fn stop_if_fatal(&self) {
        if self
            .driver
            .fatal
            .lock()
            .expect("fatal slot lock poisoned")
            .is_some()
        {
            self.leave.cancel();
        }
    }
}

impl Worker for MembershipWorker {
    fn name(&self) -> String {
        "membership".into()
    }

    fn progress(&self) -> Progress {
        let d = &self.driver;
        let view = d.view.borrow();
        Progress {
            detail: format!(
                "SWIM/foca + phi; {} members, {} available; view version {}{}",
                view.members.len(),
                view.alive.len() + 1,
                view.version,
                if view.ready { "" } else { "; not ready" }
            ),
            queue: None,
        }
    }

    async fn work(&mut self, stop: &CancellationToken) -> Result<WorkerState, String> {
        if !self.started {
            self.started = true;
            let d = &mut self.driver;
            d.publish_meta(RingStatus::Joining);
            d.announce_to_seeds();
            d.drain();
            d.publish_view();
            self.last_woke = Instant::now();
        }
        let event = self.next_event(stop).await;
        // Woken: first whether this process was held up, and what its peers sent meanwhile,
        // then the event. A process stopped or starved mid-wait wakes with a refresh or timers
        // due and its peers' heartbeats queued: judged first, every peer looks silent.
        let now = Instant::now();
        let gap = now.duration_since(self.last_woke);
        self.last_woke = now;
        let d = &mut self.driver;
        let paused = gap > d.phi.config().local_pause;
        if paused {
            d.note_local_pause(gap);
        }
        if let Event::Packet(len, from) = event {
            // The oldest of any backlog; it arrived now only if the wait was not a pause.
            d.on_packet(&self.buf[..len], from, !paused);
        }
        d.read_queued(&mut self.buf);
        d.drain();
        match event {
            Event::Leave => {
                // Tell the cluster we are leaving, so peers do not wait for probes to fail.
                if let Err(e) = d.foca.leave_cluster(&mut d.rt) {
                    debug!(node = %d.me.node_id, error = %e, "leave_cluster");
                }
                d.drain();
                return Ok(WorkerState::Done);
            }
            Event::Stop => return Ok(WorkerState::Done),
            Event::Packet(..) => {}
            Event::RecvFailed(e) => debug!(node = %d.me.node_id, error = %e, "gossip recv failed"),
            Event::Timers => d.fire_timers(),
            Event::Heartbeat => d.send_heartbeats(),
            Event::Announce => d.announce_to_seeds(),
            Event::Republish => {
                let status = if d.active {
                    RingStatus::Normal
                } else {
                    d.my_meta.status
                };
                d.publish_meta(status);
            }
            Event::Refresh => {
                d.after_duplicate();
                d.publish_view();
                let members = d.members_reply();
                *d.members_seen
                    .lock()
                    .expect("members snapshot lock poisoned") = Some(members);
            }
            Event::Command(cmd) => match cmd {
                Command::Members(reply) => {
                    let _ = reply.send(d.members_reply());
                }
                Command::Adopt(layout, on, reply) => {
                    let current = d.layout_id();
                    let _ = reply.send(on.is_none_or(|id| id == current) && d.adopt(*layout));
                }
                Command::Drained(version) => {
                    d.update_meta(|m| std::mem::replace(&mut m.drained, version) != version)
                }
                Command::HoldsNothing(empty) => {
                    d.update_meta(|m| std::mem::replace(&mut m.holds_nothing, empty) != empty)
                }
                Command::Synced(version) => d.update_meta(|m| {
                    let newer = version > m.synced;
                    if newer {
                        m.synced = version;
                    }
                    newer
                }),
            },
        }
        d.drain();
        self.stop_if_fatal();
        Ok(WorkerState::Busy)
    }
}

/// What woke the membership worker (`MembershipWorker::next_event`).
enum Event {
    Leave,
    Stop,
    /// A datagram of this length, in the worker's buffer.
    Packet(usize, SocketAddr),
    RecvFailed(std::io::Error),
    Timers,
    Heartbeat,
    Announce,
    Republish,
    Refresh,
    Command(Command),
}

impl MembershipWorker {
    /// Waits for the next thing to do, without doing it (`work` first looks at what
    /// happened while it waited). Every branch is cancel-safe.
    async fn next_event(&mut self, stop: &CancellationToken) -> Event {
        let d = &mut self.driver;
        let far = Instant::now() + Duration::from_secs(3600);
        let next_timer = d.timers.peek().map(|Reverse((at, _))| *at).unwrap_or(far);
        tokio::select! {
            _ = self.leave.cancelled() => Event::Leave,
            _ = stop.cancelled() => Event::Stop,
            r = d.socket.recv_from(&mut self.buf) => match r {
                Ok((len, from)) => Event::Packet(len, from),
                Err(e) => Event::RecvFailed(e),
            },
            _ = tokio::time::sleep_until(next_timer) => Event::Timers,
            _ = self.heartbeat.tick() => Event::Heartbeat,
            _ = self.announce.tick(), if !d.active => Event::Announce,
            _ = self.republish.tick() => Event::Republish,
            _ = self.refresh.tick() => Event::Refresh,
            Some(cmd) = self.commands.recv() => Event::Command(cmd),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node knows the ring with a layout at least as new as every member's, the digest
    /// breaking a tie of versions (found in review: a node restarted holding the losing one of
    /// two layouts committed with one version became ready, and stayed so, latched).
    #[test]
    fn a_node_holding_the_losing_layout_of_a_version_does_not_know_the_ring() {
        let id = |version, digest| LayoutId { version, digest };
        assert!(!layout_known(id(0, 0), id(0, 0)), "no layout yet");
        assert!(layout_known(id(3, 5), id(0, 0)));
        assert!(layout_known(id(3, 5), id(3, 5)));
        assert!(layout_known(id(3, 5), id(2, 9)));
        assert!(!layout_known(id(3, 5), id(4, 1)));
        assert!(
            !layout_known(id(3, 5), id(3, 6)),
            "a member holds the winner of version 3"
        );
        assert!(layout_known(id(3, 6), id(3, 5)));
    }

    /// Sent tags are kept for the replay window (and a little more), at most `MAX_SENT_TAGS`
    /// of them, the oldest going first.
    #[test]
    fn sent_tags_are_kept_for_the_replay_window_and_bounded() {
        let tag = |i: u32| {
            let mut t = [0u8; TAG_LEN];
            t[..4].copy_from_slice(&i.to_be_bytes());
            t
        };
        let mut sent = SentTags::default();
        sent.record(1_000, tag(1));
        sent.record(2_000, tag(2));
        sent.record(2_000, tag(2));
        assert_eq!(sent.kept(), 2, "a tag is kept once");
        assert!(sent.sent(&tag(1)) && sent.sent(&tag(2)));
        assert!(!sent.sent(&tag(3)) && !sent.sent(&[1, 2, 3]));
        // Within the window the first is still known; past it, it goes.
        sent.record(1_000 + REPLAY_WINDOW_MS, tag(3));
        assert!(sent.sent(&tag(1)));
        sent.record(2_000 + SentTags::KEEP_MS, tag(4));
        assert!(!sent.sent(&tag(1)), "older than the window: gone");
        assert!(sent.sent(&tag(2)) && sent.sent(&tag(4)));
        let mut full = SentTags::default();
        for i in 0..MAX_SENT_TAGS as u32 + 10 {
            full.record(5_000, tag(i));
        }
        assert_eq!(full.kept(), MAX_SENT_TAGS);
        assert!(
            !full.sent(&tag(9)) && full.sent(&tag(10)),
            "the oldest went first"
        );
    }

    fn id(name: &str) -> RingId {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        RingId {
            node_id: name.into(),
            gossip: a,
            peer: a,
            client: a,
            generation: 7,
        }
    }

    /// Runs `w` until `until`, calling `check` after every step (a packet, a timer, a refresh).
    async fn run_until(
        w: &mut MembershipWorker,
        stop: &CancellationToken,
        until: Instant,
        mut check: impl FnMut(),
    ) {
        while Instant::now() < until {
            // A step waits in a select of cancel-safe futures: cutting it at `until` loses nothing.
            let _ = tokio::time::timeout_at(until, w.work(stop)).await;
            check();
        }
    }

    /// Members named `a`, `b`, `c`… on loopback (`a` seeding `b`, every other seeding `a`),
    /// with a phi detector that
    /// learns a regular 500 ms beat (a window of two intervals forgets a burst of queued
    /// heartbeats within a second) and, with no acceptable pause, suspects a peer silent for
    /// ~0.8 s: a 1.2 s silence is past its tolerance, and far below the ~4 s after which SWIM
    /// declares a member down.
    /// Without `grace`, a local pause gives no grace (`PhiConfig::pause_grace`).
    async fn quick_phi_cluster<const N: usize>(
        grace: bool,
    ) -> [(super::super::Membership, MembershipWorker); N] {
        let phi = PhiConfig {
            acceptable_pause: Duration::ZERO,
            min_std_dev: Duration::from_millis(50),
            window: 2,
            pause_grace: if grace {
                PhiConfig::default().pause_grace
            } else {
                Duration::ZERO
            },
            ..PhiConfig::default()
        };
        let bind = || async {
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("a loopback UDP socket binds")
        };
        let mut sockets = Vec::new();
        for _ in 0..N {
            sockets.push(bind().await);
        }
        let gossip: Vec<SocketAddr> = sockets
            .iter()
            .map(|s| s.local_addr().expect("bound"))
            .collect();
        let start = |name: String, socket, seed| {
            let info = MemberInfo {
                node_id: name,
                client_addr: "127.0.0.1:1".into(),
                peer_addr: "127.0.0.1:1".into(),
                vnodes: 8,
                generation: now_ms(),
            };
            let cfg = SwimConfig {
                cluster_name: "quick-phi".into(),
                secret: crate::config::Secret::new("s3cret"),
                seeds: vec![seed],
                phi: phi.clone(),
                vnodes: 8,
                ring_file: None,
                lone: false,
                layout_file: None,
                auto_join: false,
                generation_file: None,
            };
            super::super::Membership::start(info, socket, cfg, CancellationToken::new())
        };
        let mut sockets = sockets.into_iter();
        std::array::from_fn(|i| {
            let name = char::from(b'a' + i as u8).to_string();
            let seed = gossip[if i == 0 { 1 } else { 0 }];
            start(name, sockets.next().expect("one socket per member"), seed)
        })
    }

    /// Steps `w` on its own task until `stop`, not while `hold` is set.
    fn run_held(
        mut w: MembershipWorker,
        stop: CancellationToken,
        hold: Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if hold.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                } else {
                    let _ = w.work(&stop).await;
                }
            }
        })
    }

    /// Holds `w` for `ms` in the middle of a step, parked in its select as a process stopped by
    /// `SIGSTOP` or starved of CPU is, then lets that step finish: it wakes with whatever
    /// became ready meanwhile (a refresh, a timer, a packet).
    async fn hold_mid_step(w: &mut MembershipWorker, stop: &CancellationToken, ms: u64) {
        loop {
            let mut step = Box::pin(w.work(stop));
            if tokio::time::timeout(Duration::from_millis(1), &mut step)
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = step.await;
                return;
            }
        }
    }

    /// Steps `w` for `ms` milliseconds and counts the steps after which `bad` holds.
    async fn count_steps(
        w: &mut MembershipWorker,
        stop: &CancellationToken,
        ms: u64,
        mut bad: impl FnMut() -> bool,
    ) -> usize {
        let mut count = 0;
        run_until(w, stop, Instant::now() + Duration::from_millis(ms), || {
            count += usize::from(bad());
        })
        .await;
        count
    }

    /// Steps `w` for `ms` milliseconds.
    async fn run_for(w: &mut MembershipWorker, stop: &CancellationToken, ms: u64) {
        run_until(w, stop, Instant::now() + Duration::from_millis(ms), || {}).await;
    }

    /// Steps `w` until `a` (its member) takes `b` out of routing, for at most 3 s.
    async fn until_b_dropped(
        w: &mut MembershipWorker,
        a: &super::super::Membership,
        stop: &CancellationToken,
        when: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while a.view().alive.contains("b") {
            assert!(
                Instant::now() < deadline,
                "{when}: a still routes to b after 3 s of silence"
            );
            run_for(w, stop, 50).await;
        }
    }

    /// Steps `w` until `a` (its member) sees `b` available, for at most 10 s.
    async fn until_b_alive(
        w: &mut MembershipWorker,
        a: &super::super::Membership,
        stop: &CancellationToken,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.view().alive.contains("b") {
            assert!(Instant::now() < deadline, "a never saw b alive");
            run_for(w, stop, 100).await;
        }
    }

    /// A node whose membership worker was held up (a starved runtime, a stopped process)
    /// judges its peers on what they sent meanwhile: the packets queued in its socket are read
    /// before a timer fires or the view is refreshed, so a peer that kept sending heartbeats is
    /// never published unavailable. Found in a Jepsen run: ~0.25 s (one view refresh) of
    /// `Unavailable: 1 replicas reachable, 2 needed` on a node whose refresh ran before the
    /// heartbeats it had queued (the worker's select picks among ready branches at random).
    #[tokio::test(flavor = "current_thread")]
    async fn a_held_up_worker_reads_queued_heartbeats_before_judging_its_peers() {
        // Without the grace after a local pause, which would hide what this test is about.
        let [(a, mut wa), (_b, wb), (_c, wc)] = quick_phi_cluster(false).await;
        let stop = CancellationToken::new();
        // b and c run on their own, also while a is held up.
        let others = [wb, wc].map(|w| run_held(w, stop.clone(), Default::default()));
        let both_alive = || ["b", "c"].iter().all(|m| a.view().alive.contains(*m));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !both_alive() {
            assert!(Instant::now() < deadline, "a never saw b and c alive");
            run_for(&mut wa, &stop, 100).await;
        }
        // Each hold-up is a chance for the refresh or a timer to run before the queued
        // heartbeats, or for the view to be judged between two of them.
        let mut published_down = 0;
        let mut taken_out = 0;
        for _ in 0..6 {
            // A steady beat learned, then a hold-up past phi's tolerance.
            run_for(&mut wa, &stop, 1500).await;
            assert!(both_alive(), "b and c are alive for a before the hold-up");
            let before = a.stats.unroutable.get();
            hold_mid_step(&mut wa, &stop, 1200).await;
            published_down += usize::from(!both_alive());
            published_down += count_steps(&mut wa, &stop, 400, || !both_alive()).await;
            // Also a view published and replaced within one step.
            taken_out += a.stats.unroutable.get() - before;
        }
        stop.cancel();
        for w in others {
            w.await.expect("a worker loop ends");
        }
        assert_eq!(
            (published_down, taken_out),
            (0, 0),
            "a took b or c out of routing after hold-ups, though their heartbeats sat in its \
             socket (steps that ended so, members taken out)"
        );
    }

    /// A peer back from a silence past phi's tolerance is routable again in the step that reads
    /// its first heartbeat, not at the next view refresh (up to 250 ms later, every request
    /// meanwhile refused or sent elsewhere).
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_back_from_silence_is_available_on_its_first_heartbeat() {
        let [(a, mut wa), (_b, wb)] = quick_phi_cluster(true).await;
        let stop = CancellationToken::new();
        let hold_b = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let b = run_held(wb, stop.clone(), hold_b.clone());
        until_b_alive(&mut wa, &a, &stop).await;
        let b_alive = || a.view().alive.contains("b");
        for round in 0..3 {
            run_for(&mut wa, &stop, 1500).await;
            assert!(
                b_alive(),
                "round {round}: b is alive for a before its silence"
            );
            hold_b.store(true, std::sync::atomic::Ordering::SeqCst);
            until_b_dropped(&mut wa, &a, &stop, &format!("round {round}")).await;
            assert!(
                a.stats.unroutable.get() > round as u64,
                "round {round}: b taken out of routing is counted"
            );
            let heard = a.stats.heartbeats_in.get();
            hold_b.store(false, std::sync::atomic::Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(3);
            while a.stats.heartbeats_in.get() == heard {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: b's heartbeats never came back"
                );
                let _ = tokio::time::timeout(Duration::from_millis(50), wa.work(&stop)).await;
            }
            assert!(
                b_alive(),
                "round {round}: a read b's heartbeat but still publishes it unavailable"
            );
        }
        stop.cancel();
        b.await.expect("b's worker loop ends");
    }

    /// A peer held up together with this node (one starved machine, a paused VM, two processes
    /// stopped at once) had no chance to send heartbeats either: right after a local pause
    /// phi takes no routed peer out for a grace of two heartbeat intervals, and a peer silent
    /// alone is still taken out once the grace is over. Before, the resumed node published
    /// such a peer unavailable until its first heartbeat came (seen in `pause` Jepsen runs).
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_held_up_with_this_node_stays_routed_after_the_pause() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let [(a, mut wa), (_b, wb)] = quick_phi_cluster(true).await;
        let stop = CancellationToken::new();
        let hold_b = Arc::new(AtomicBool::new(false));
        let b = run_held(wb, stop.clone(), hold_b.clone());
        until_b_alive(&mut wa, &a, &stop).await;
        let b_alive = || a.view().alive.contains("b");
        let mut published_down = 0;
        for round in 0..3 {
            run_for(&mut wa, &stop, 1500).await;
            assert!(
                b_alive(),
                "round {round}: b is alive for a before the pause"
            );
            let pauses = a.stats.local_pauses.get();
            // b stops first, and a reads what b sent before it stopped, so that nothing of b
            // is queued for a when both resume: then a holds still too, mid-step.
            hold_b.store(true, SeqCst);
            run_for(&mut wa, &stop, 300).await;
            hold_mid_step(&mut wa, &stop, 1200).await;
            published_down += usize::from(!b_alive());
            hold_b.store(false, SeqCst);
            published_down += count_steps(&mut wa, &stop, 400, || !b_alive()).await;
            assert!(
                a.stats.local_pauses.get() > pauses,
                "round {round}: a counts its hold-up as a local pause"
            );
        }
        assert_eq!(
            published_down, 0,
            "a published b unavailable right after a pause both took"
        );
        // The grace ends: b silent on its own is taken out of routing (once phi forgot the
        // long interval the pause put in its window of two).
        run_for(&mut wa, &stop, 1500).await;
        hold_b.store(true, SeqCst);
        until_b_dropped(&mut wa, &a, &stop, "after the grace").await;
        stop.cancel();
        b.await.expect("b's worker loop ends");
    }

    /// Two live processes with one node id: the newcomer (the larger generation, the gossip
    /// address breaking a tie) stops, the older keeps serving; a packet of this process's own
    /// address or sent before it started (a previous process, delayed) says nothing.
    #[test]
    fn of_two_live_processes_with_one_node_id_the_newcomer_stops() {
        let started = 1_800_000_000_000u64;
        let mine: SocketAddr = "10.0.0.1:7479".parse().unwrap();
        let other: SocketAddr = "10.0.0.2:7479".parse().unwrap();
        let me = RingId {
            gossip: mine,
            generation: started,
            ..id("n1")
        };
        let judge = |theirs, from, sent| judge_own_id(&me, started, 0, theirs, from, sent);
        // An older process elsewhere is alive after we started: we are the newcomer.
        assert_eq!(
            judge(started - 3_600_000, other, started + 5),
            OwnId::StopSelf
        );
        // A newer one: it is the newcomer; we keep serving.
        assert_eq!(judge(started + 10, other, started + 20), OwnId::Incumbent);
        // Same generation: the larger gossip address stops.
        assert_eq!(judge(started, other, started + 1), OwnId::Incumbent);
        let lower: SocketAddr = "10.0.0.0:7479".parse().unwrap();
        assert_eq!(judge(started, lower, started + 1), OwnId::StopSelf);
        // Sent before this process started: a previous process's packet, delayed.
        assert_eq!(
            judge(started - 3_600_000, other, started - 1),
            OwnId::Ignore
        );
        // Our own address: not another process.
        assert_eq!(judge(started - 1, mine, started + 1), OwnId::Ignore);
        // An older process renewed above us after we went silent is still "another process":
        // judged by what it says now (docs/operations.md says what that rare case does).
        assert_eq!(judge(started + 1, other, started + 9_000), OwnId::Incumbent);
        // Once this process renewed above a newcomer (`reclaim`), a packet of the generation it
        // superseded, delayed or from the newcomer back from a pause, does not stop it, though
        // its own generation is now the larger.
        let renewed = RingId {
            generation: started + 501,
            ..me.clone()
        };
        let newcomer = started + 500;
        assert_eq!(
            judge_own_id(&renewed, started, newcomer, newcomer, other, started + 400),
            OwnId::Incumbent
        );
        // Without that memory it would have stopped.
        assert_eq!(
            judge_own_id(&renewed, started, 0, newcomer, other, started + 400),
            OwnId::StopSelf
        );
        // A third process, newer than the one superseded, is judged as any other.
        assert_eq!(
            judge_own_id(
                &renewed,
                started,
                newcomer,
                started + 900,
                other,
                started + 950
            ),
            OwnId::Incumbent
        );
        assert_eq!(
            judge_own_id(
                &renewed,
                started,
                newcomer,
                started + 501,
                lower,
                started + 950
            ),
            OwnId::StopSelf
        );
    }

    /// The older process takes its place back only once the other is gone: not while it is
    /// heard or known alive (it may be about to stop), and then above the newest identity the
    /// cluster routes to. An older identity (a previous process, dead) needs nothing.
    #[test]
    fn the_older_process_reclaims_its_place_only_once_the_newer_is_gone() {
        let mine = 1_000;
        // Heard within the silence window: alert, wait.
        let r = reclaim(mine, Some((2_000, true)), &[(2_000, false)]);
        assert_eq!((r.alert, r.renew_above), (true, None));
        // Silent, but the cluster still has it alive: wait (it may be cut off, not gone).
        let r = reclaim(mine, Some((2_000, false)), &[(2_000, false)]);
        assert_eq!((r.alert, r.renew_above), (true, None));
        // Silent and down: renew above it.
        let r = reclaim(mine, Some((2_000, false)), &[(2_000, true)]);
        assert_eq!((r.alert, r.renew_above), (false, Some(2_000)));
        // Never heard directly (it stopped at once), down for the cluster: renew.
        let r = reclaim(mine, None, &[(2_000, true)]);
        assert_eq!(r.renew_above, Some(2_000));
        // Silent, and unknown to foca: renew above what was heard.
        assert_eq!(
            reclaim(mine, Some((2_000, false)), &[]).renew_above,
            Some(2_000)
        );
        // Above the newest of several.
        let r = reclaim(mine, None, &[(2_000, true), (3_000, true), (500, true)]);
        assert_eq!(r.renew_above, Some(3_000));
        // Only older identities (a restart at a new address; the old process dead or dying):
        // nothing to reclaim, no alert.
        let r = reclaim(mine, None, &[(500, false)]);
        assert_eq!((r.alert, r.renew_above), (false, None));
        assert_eq!(reclaim(mine, None, &[]).renew_above, None);
    }

    /// Found in review: a node restarted with its clock behind its last start got a smaller
    /// generation, lost every address conflict (peers ignored it) and published metadata below
    /// its previous process's versions until the clock caught up.
    #[test]
    fn a_restarted_process_outranks_the_previous_one_whatever_the_clock() {
        let old = 1_800_000_000_000u64;
        let behind = next_generation(Some(old), old - 60_000);
        assert!(behind > old);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = |generation| RingId {
            node_id: "x".into(),
            gossip: addr,
            peer: addr,
            client: addr,
            generation,
        };
        assert!(a(behind).win_addr_conflict(&a(old)));
        assert!(next_meta_version(0, behind) > next_meta_version(7, old));
        // With the clock ahead, the clock.
        assert_eq!(next_generation(Some(old), old + 5), old + 5);
        assert_eq!(next_generation(None, 42), 42);
    }

    /// Found in review: a removed node (and one that started, was never taken into the layout
    /// and went away) stayed in `cluster.members_by_state{state="down"}` forever, so the
    /// "member down" alert could not be cleared by the remove the runbook prescribes.
    #[test]
    fn only_owners_and_running_non_owners_count_as_members() {
        let mut layout = (*crate::testkit::b_replaced_by_d(&["b", "c", "d"]).layout).clone();
        layout.retired.insert("e".into());
        let member = |node: &str, state: &str| MemberStatus {
            node_id: node.into(),
            client_addr: String::new(),
            peer_addr: String::new(),
            gossip_addr: String::new(),
            swim_state: SWIM_STATE_NAMES
                .iter()
                .position(|s| *s == state)
                .expect("a state name") as u8,
            incarnation: 0,
            generation: 0,
            phi_milli: 0,
            last_heard_ms: 0,
            ring_status: ring_role(&layout, node).code(),
            vnodes: 16,
            available: state != "down",
            is_self: false,
        };
        // Owners now (b is leaving) or after the running change (d joins): down or not.
        for node in ["a", "b", "c", "d"] {
            for state in SWIM_STATE_NAMES {
                assert!(
                    counted_member(&layout, &member(node, state)),
                    "{node} {state}"
                );
            }
        }
        // Retired: never. Outside the layout: while it runs.
        for state in SWIM_STATE_NAMES {
            assert!(!counted_member(&layout, &member("e", state)), "e {state}");
        }
        assert!(counted_member(&layout, &member("f", "alive")));
        assert!(counted_member(&layout, &member("f", "suspect")));
        assert!(!counted_member(&layout, &member("f", "down")));
        // `kvctl members` lists every member but one outside the layout (f) that has been
        // down and silent for `LIST_GONE_OUTSIDER_FOR`, or was never heard by this process.
        let silent = |node: &str, state: &str, ms: u64| MemberStatus {
            last_heard_ms: ms,
            ..member(node, state)
        };
        let long = LIST_GONE_OUTSIDER_FOR.as_millis() as u64;
        for node in ["a", "b", "c", "d", "e"] {
            for state in SWIM_STATE_NAMES {
                for ms in [0, long, u64::MAX] {
                    assert!(!gone_outsider(&layout, &silent(node, state, ms)), "{node}");
                }
            }
        }
        assert!(!gone_outsider(&layout, &silent("f", "down", long - 1)));
        assert!(gone_outsider(&layout, &silent("f", "down", long)));
        assert!(gone_outsider(&layout, &silent("f", "down", u64::MAX)));
        assert!(!gone_outsider(&layout, &silent("f", "suspect", u64::MAX)));
        assert!(!gone_outsider(
            &layout,
            &MemberStatus {
                is_self: true,
                ..silent("f", "down", u64::MAX)
            }
        ));
    }

    /// The generation file round-trips (a renewed generation is saved like the boot one).
    #[test]
    fn a_saved_generation_is_what_the_next_start_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation");
        assert_eq!(load_generation(&path), None);
        save_generation(&path, 1_800_000_000_123).unwrap();
        save_generation(&path, 1_800_000_000_124).unwrap();
        assert_eq!(load_generation(&path), Some(1_800_000_000_124));
        std::fs::write(&path, "not a number").unwrap();
        assert_eq!(load_generation(&path), None);
    }

    #[test]
    fn envelope_round_trips_and_rejects_forgeries() {
        let env = Envelope::new("prod", "s3cret");
        let me = id("n1");
        let now = 1_000_000;
        let pkt = env.seal(KIND_FOCA, &me, now, b"payload");
        let o = env.open(&pkt, now).unwrap();
        assert_eq!(
            (o.kind, o.node_id, o.payload),
            (KIND_FOCA, "n1", &b"payload"[..])
        );
        // Wrong secret, same cluster: the MAC fails.
        let other_secret = Envelope::new("prod", "guess");
        assert_eq!(other_secret.open(&pkt, now).err(), Some(Reject::Mac));
        // Another cluster name: rejected before the MAC.
        assert_eq!(
            Envelope::new("dev", "s3cret").open(&pkt, now).err(),
            Some(Reject::Cluster)
        );
        // Any flipped bit breaks the tag.
        for i in [1, 12, 30, pkt.len() - 1] {
            let mut bad = pkt.clone();
            bad[i] ^= 0x40;
            assert!(env.open(&bad, now).is_err(), "flip at {i} accepted");
        }
        // Replays outside the window.
        assert_eq!(
            env.open(&pkt, now + REPLAY_WINDOW_MS + 1).err(),
            Some(Reject::Stale)
        );
        assert_eq!(env.open(&pkt[..10], now).err(), Some(Reject::Short));
    }

    /// A node's metadata counts as its current process's word only if that process published
    /// it: a restarted process (a later generation, its start time in ms) publishes at or
    /// above `generation << 20`, so its predecessor's metadata is below.
    #[test]
    fn only_the_current_process_says_a_node_holds_nothing() {
        let old_process = 1_764_000_000_000u64;
        let restarted = old_process + 5_000;
        let said = next_meta_version(next_meta_version(0, old_process), old_process);
        assert!(from_current_process(said, Some(old_process)));
        assert!(!from_current_process(said, Some(restarted)));
        assert!(from_current_process(
            next_meta_version(said, restarted),
            Some(restarted)
        ));
        // A renewed identity (same process, generation + 1) counts once it published again.
        assert!(!from_current_process(said, Some(old_process + 1)));
        assert!(from_current_process(
            next_meta_version(said, old_process + 1),
            Some(old_process + 1)
        ));
        // Not known to SWIM: nothing to compare with (a down node is not alive anyway).
        assert!(from_current_process(said, None));
    }

    /// A saved member n2 (generation 7, metadata version 9).
    fn saved_n2() -> SavedMember {
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        SavedMember {
            id: RingId {
                node_id: "n2".into(),
                gossip: addr,
                peer: addr,
                client: addr,
                generation: 7,
            },
            meta: RingMeta {
                node_id: "n2".into(),
                version: 9,
                status: RingStatus::Normal,
                vnodes: 64,
                layout_version: 4,
                layout_digest: 77,
                synced: LayoutId {
                    version: 3,
                    digest: 0,
                },
                auto_join: false,
                drained: LayoutId {
                    version: 4,
                    digest: 0,
                },
                holds_nothing: false,
            },
        }
    }

    #[test]
    fn only_a_change_beyond_the_metadata_version_rewrites_the_ring_file() {
        let old = saved_n2();
        let mut republished = old.clone();
        republished.meta.version += 1;
        assert!(!saved_content_differs(&old, &republished));
        let mut restarted = republished.clone();
        restarted.id.generation += 1;
        assert!(saved_content_differs(&old, &restarted));
        let mut new_layout = republished.clone();
        new_layout.meta.layout_version += 1;
        assert!(saved_content_differs(&old, &new_layout));
    }

    /// A ring file saved before `synced`/`drained` became layout ids still names its members
    /// (found in review: every old line failed to parse and was skipped, so a node restarted
    /// without seeds after the upgrade would have started alone).
    #[test]
    fn a_ring_file_of_the_previous_format_still_loads() {
        let member = saved_n2();
        let mut old = serde_json::to_value(&member).unwrap();
        old["meta"]["synced"] = serde_json::json!(3);
        old["meta"]["drained"] = serde_json::json!(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring.jsonl");
        let text = format!(
            "{}\n{}\nnot json\n",
            old,
            serde_json::to_string(&member).unwrap()
        );
        std::fs::write(&path, text).unwrap();
        assert_eq!(
            load_ring("n1", &path),
            vec![member.clone(), member],
            "the old line and the new one load alike; the bad line is skipped"
        );
    }

    #[test]
    fn metadata_handler_keeps_only_news() {
        let table: MetaTable = Arc::new(Mutex::new(BTreeMap::new()));
        let mut h = MetaHandler {
            table: table.clone(),
        };
        let m = |v: u64, status| {
            postcard::to_allocvec(&RingMeta {
                node_id: "n2".into(),
                version: v,
                status,
                vnodes: 64,
                layout_version: 1,
                layout_digest: 2,
                synced: LayoutId::default(),
                auto_join: true,
                drained: LayoutId {
                    version: 1,
                    digest: 2,
                },
                holds_nothing: false,
            })
            .unwrap()
        };
        assert!(h
            .receive_item(&m(5, RingStatus::Joining), None)
            .unwrap()
            .is_some());
        assert!(
            h.receive_item(&m(5, RingStatus::Joining), None)
                .unwrap()
                .is_none(),
            "duplicate"
        );
        assert!(
            h.receive_item(&m(4, RingStatus::Normal), None)
                .unwrap()
                .is_none(),
            "stale"
        );
        assert!(h
            .receive_item(&m(6, RingStatus::Normal), None)
            .unwrap()
            .is_some());
        assert_eq!(table.lock().unwrap()["n2"].status, RingStatus::Normal);
        assert!(h.receive_item(b"\xff\xff", None).is_err());
        let k = |v| MetaKey {
            node_id: "n2".into(),
            version: v,
        };
        assert!(k(6).invalidates(&k(5)));
        assert!(!k(5).invalidates(&k(6)));
    }

    #[test]
    fn a_renewed_identity_wins_over_the_old_one() {
        let old = id("n1");
        let new = old.renew().unwrap();
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        assert_eq!(new.addr(), old.addr());
    }

    /// Regression: versions were `generation << 20 | (counter & 0xFFFFF)`, so after 2^20
    /// publications (a republication every 5 s, plus one per member event) the version went
    /// back down and every peer ignored this node's newer metadata (a status change lost).
    #[test]
    fn metadata_versions_keep_increasing_past_2_pow_20_publications_and_restarts() {
        let generation = 1_764_000_000_000;
        let mut v = 0;
        for _ in 0..(1u64 << 20) + 10 {
            let next = next_meta_version(v, generation);
            assert!(next > v, "{next} after {v}");
            v = next;
        }
        // A restart a second later publishes above everything the old process did.
        let restarted = next_meta_version(0, generation + 1000);
        assert!(restarted > v);
        // An automatic rejoin (generation + 1) keeps increasing too.
        assert!(next_meta_version(v, generation + 1) > v);
    }

    #[test]
    fn foca_packets_fit_in_a_datagram_with_the_envelope() {
        let c = foca_config();
        assert!(c.max_packet_size.get() + FIXED_LEN + 64 + TAG_LEN <= MAX_DATAGRAM);
        assert!(c.max_transmissions.get() >= 6);
        let down = c
            .periodic_announce_to_down_members
            .expect("announces to down members");
        assert!(down.frequency <= Duration::from_secs(2));
    }
}

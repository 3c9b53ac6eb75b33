//! Applies objects with a fixed number in flight and times each from its
//! create call to the first watch event that shows it Ready, counting the
//! API writes the system under test made meanwhile and until its namespace
//! is quiet again. The same driver serves Wrenn and the peer, so both are
//! timed by the same clock, the same watch and the same client.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

use crate::bench::figures::Measured;

/// A scenario's writes are counted until none was seen for this long: a
/// system's trailing writes (Events published after Ready, status
/// updates) are its own, and must not land in the next scenario's window.
const QUIET: Duration = Duration::from_millis(500);

/// ... but no longer than this after the last object was Ready.
const QUIET_AT_MOST: Duration = Duration::from_secs(30);

/// What to apply and when it counts as Ready.
pub struct Target {
    /// The measured kind.
    pub kind: ApiResource,
    /// Builds the object called `name`.
    pub make: Box<dyn Fn(&str) -> DynamicObject + Send + Sync>,
    /// True once the object is Ready (Wrenn: Running).
    pub ready: fn(&DynamicObject) -> bool,
    /// Other kinds whose writes in the namespace are the system's work for
    /// these objects (child Pods and Services, Events).
    pub counted: Vec<ApiResource>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("kind", &self.kind.kind)
            .field(
                "counted",
                &self.counted.iter().map(|k| &k.kind).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// One scenario: `objects` objects named `prefix-N`, `in_flight` at a time.
#[derive(Clone, Debug)]
pub struct Load {
    /// Name prefix, unique per scenario.
    pub prefix: String,
    /// Objects to apply.
    pub objects: usize,
    /// At most this many created and not yet Ready.
    pub in_flight: usize,
    /// Give up on an object after this long.
    pub timeout: Duration,
}

/// A write seen on a watch.
struct Write {
    kind: String,
    uid: String,
    rv: String,
    at: Instant,
}

#[derive(Default)]
struct Shared {
    /// Every write seen after the watches' initial lists.
    writes: Vec<Write>,
    /// First time each measured object (by name) was seen Ready.
    ready: HashMap<String, Instant>,
    /// Workers waiting for an object to become Ready.
    waiters: HashMap<String, oneshot::Sender<Instant>>,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panicked watcher task leaves plain data behind: still readable.
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `load` of `target` in namespace `ns`.
pub async fn run(client: &Client, ns: &str, target: &Target, load: &Load) -> Result<Measured> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut kinds = vec![(target.kind.clone(), Some(target.ready))];
    kinds.extend(target.counted.iter().cloned().map(|k| (k, None)));
    let mut watches = Vec::new();
    let mut synced = Vec::new();
    for (kind, ready) in kinds {
        let (tx, rx) = oneshot::channel();
        synced.push(rx);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind);
        watches.push(tokio::spawn(follow(
            api,
            kind.kind,
            ready,
            shared.clone(),
            tx,
        )));
    }
    // Only writes after every initial list count, and every one after it.
    for s in synced {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .context("watch never listed")?
            .context("watch ended before listing")?;
    }

    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &target.kind);
    let next = Arc::new(AtomicUsize::new(0));
    let objects = build_all(target, load);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..load.in_flight.max(1) {
        let (api, next, shared) = (api.clone(), next.clone(), shared.clone());
        workers.spawn(worker(api, next, shared, load.timeout, objects.clone()));
    }
    let mut created = Vec::new();
    while let Some(done) = workers.join_next().await {
        created.extend(done.context("worker panicked")??);
    }
    let wall = started.elapsed();
    let quiet = quiet(&shared).await;
    for w in watches {
        w.abort();
    }
    Ok(measure(
        &lock(&shared),
        &created,
        target,
        started,
        wall,
        quiet,
    ))
}

/// Waits until no write was seen for [`QUIET`] (at most [`QUIET_AT_MOST`]),
/// and returns then: the end of the scenario's write window.
async fn quiet(shared: &Mutex<Shared>) -> Instant {
    let give_up = Instant::now() + QUIET_AT_MOST;
    loop {
        let last = lock(shared).writes.last().map(|w| w.at);
        let now = Instant::now();
        let last = last.unwrap_or(now);
        if now.duration_since(last) >= QUIET || now >= give_up {
            return now;
        }
        tokio::time::sleep(QUIET.saturating_sub(now.duration_since(last))).await;
    }
}

/// The objects of `load`, built up front so a worker never calls back into
/// `target` (whose builder need not be `'static`).
fn build_all(target: &Target, load: &Load) -> Arc<Vec<DynamicObject>> {
    Arc::new(
        (0..load.objects)
            .map(|i| (target.make)(&format!("{}-{i}", load.prefix)))
            .collect(),
    )
}

/// One object created by the bench: uid, create resourceVersion, and
/// when its create call started and when it was seen Ready.
struct Created {
    uid: String,
    rv: String,
    t0: Instant,
    ready: Instant,
}

async fn worker(
    api: Api<DynamicObject>,
    next: Arc<AtomicUsize>,
    shared: Arc<Mutex<Shared>>,
    timeout: Duration,
    objects: Arc<Vec<DynamicObject>>,
) -> Result<Vec<Created>> {
    let mut done = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(obj) = objects.get(i) else {
            return Ok(done);
        };
        let name = obj.name_any();
        let t0 = Instant::now();
        let c = api
            .create(&PostParams::default(), obj)
            .await
            .with_context(|| format!("create {name}"))?;
        let (uid, rv) = (
            c.uid().context("created object has no uid")?,
            c.resource_version()
                .context("created object has no resourceVersion")?,
        );
        let rx = {
            let mut s = lock(&shared);
            if let Some(at) = s.ready.get(&name).copied() {
                done.push(Created {
                    uid,
                    rv,
                    t0,
                    ready: at,
                });
                continue;
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.insert(name.clone(), tx);
            rx
        };
        let ready = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| anyhow!("{name} not Ready within {timeout:?}"))?
            .map_err(|_| anyhow!("the watch ended before {name} was Ready"))?;
        done.push(Created { uid, rv, t0, ready });
    }
}

/// Follows `api`, recording each write and, for the measured kind, when
/// each object is first seen Ready.
async fn follow(
    api: Api<DynamicObject>,
    kind: String,
    ready: Option<fn(&DynamicObject) -> bool>,
    shared: Arc<Mutex<Shared>>,
    synced: oneshot::Sender<()>,
) {
    let mut synced = Some(synced);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(ev) = stream.next().await {
        let at = Instant::now();
        let obj = match ev {
            Ok(watcher::Event::InitDone) => {
                if let Some(s) = synced.take() {
                    let _ = s.send(());
                }
                continue;
            }
            Ok(watcher::Event::Apply(o)) => o,
            // The initial list and deletes are not writes of the scenario;
            // a watch error is retried by the watcher itself.
            Ok(_) | Err(_) => continue,
        };
        let (Some(uid), Some(rv)) = (obj.uid(), obj.resource_version()) else {
            continue;
        };
        let mut s = lock(&shared);
        s.writes.push(Write {
            kind: kind.clone(),
            uid,
            rv,
            at,
        });
        if ready.is_some_and(|r| r(&obj)) {
            let name = obj.name_any();
            if !s.ready.contains_key(&name) {
                s.ready.insert(name.clone(), at);
                if let Some(w) = s.waiters.remove(&name) {
                    let _ = w.send(at);
                }
            }
        }
    }
}

fn measure(
    s: &Shared,
    created: &[Created],
    target: &Target,
    started: Instant,
    wall: Duration,
    quiet: Instant,
) -> Measured {
    let mut m = Measured::new(
        created
            .iter()
            .map(|c| (c.ready - c.t0).as_secs_f64() * 1e3)
            .collect(),
        wall.as_secs_f64(),
    );
    let n = created.len().max(1) as f64;
    let ours: BTreeMap<&str, &Created> = created.iter().map(|c| (c.uid.as_str(), c)).collect();
    let creates: BTreeSet<(&str, &str)> = created
        .iter()
        .map(|c| (c.uid.as_str(), c.rv.as_str()))
        .collect();
    let end = quiet.max(started + wall);
    // A watch can repeat an event after a relist: count each version once.
    let mut seen = BTreeSet::new();
    let mut own = 0usize;
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for w in &s.writes {
        if w.at < started || w.at > end || creates.contains(&(w.uid.as_str(), w.rv.as_str())) {
            continue;
        }
        if !seen.insert((w.uid.as_str(), w.rv.as_str())) {
            continue;
        }
        *by_kind.entry(w.kind.clone()).or_default() += 1;
        if w.kind == target.kind.kind && ours.get(w.uid.as_str()).is_some_and(|c| w.at <= c.ready) {
            own += 1;
        }
    }
    m.own_writes = own as f64 / n;
    m.all_writes = by_kind.values().sum::<usize>() as f64 / n;
    m.writes_by_kind = by_kind
        .into_iter()
        .map(|(k, v)| (k, v as f64 / n))
        .collect();
    m
}

/// Waits until `api`'s object `name` satisfies `done`, watching it.
pub async fn wait_for(
    api: &Api<DynamicObject>,
    name: &str,
    timeout: Duration,
    done: impl Fn(&DynamicObject) -> bool,
) -> Result<DynamicObject> {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api.clone(), cfg));
    let mut last = None;
    let found = tokio::time::timeout(timeout, async {
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
                if done(&o) {
                    return Some(o);
                }
                last = Some(o);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(o)) => Ok(o),
        _ => bail!(
            "{name} not ready within {timeout:?}; last status: {}",
            last.and_then(|o| o.data.get("status").map(ToString::to_string))
                .unwrap_or_else(|| "none".into())
        ),
    }
}

/// True when `.status.conditions` has `type` with status "True".
pub fn condition_true(obj: &DynamicObject, type_: &str) -> bool {
    obj.data
        .pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.get("type").and_then(|t| t.as_str()) == Some(type_)
                    && c.get("status").and_then(|s| s.as_str()) == Some("True")
            })
        })
}

/// `obj`'s `.status.<field>` as a string.
pub fn status_str<'a>(obj: &'a DynamicObject, field: &str) -> Option<&'a str> {
    obj.data
        .get("status")
        .and_then(|s| s.get(field))
        .and_then(|v| v.as_str())
}

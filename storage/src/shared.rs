//! Parquet on S3-compatible object storage shared by several collectors (`[storage] url`).
//!
//! Each node writes and commits its files locally as without `[storage]` (the WAL, the
//! dedup index and the local manifest stay the commit point of flushes and compactions),
//! then publishes them: it uploads each committed file it has not uploaded yet as
//! `<prefix>/events/<partition>/<node>-<file>`, and then puts `<prefix>/nodes/<node>.json`,
//! the list of its committed objects. That one object is the node's commit on the shared
//! store: a reader sees a node's file only once a node list names it, so it never reads
//! half an upload. Objects a node no longer lists (compacted away) are deleted by that
//! node only, after a grace period for queries planned over them elsewhere.
//!
//! Readers list `<prefix>/nodes/` and fetch the node lists whose ETag changed; the other
//! nodes' files join the local ones in every [`Snapshot`](crate::Snapshot).
//!
//! A crash between a local commit and its publication loses nothing: the local manifest
//! still names the files, and start-up publishes them (and deletes the node's objects that
//! no list names: uploads cut short, deletes not yet done).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::config::StorageConfig;
use crate::error::{Result, StorageError};
use crate::manifest::{FileMeta, Manifest};

/// The file that keeps a data dir's node id.
pub const NODE_ID_FILE: &str = "node_id";

/// How long an object a node no longer lists stays for queries planned over it.
const DELETE_GRACE: Duration = Duration::from_secs(120);

/// Where readers find the shared files: a URL to register the store under in DataFusion
/// (`s3://bucket`) and the store itself.
#[derive(Clone, Debug)]
pub struct SharedReader {
    pub url: String,
    pub store: Arc<dyn ObjectStore>,
}

/// A node's list of committed objects, `<prefix>/nodes/<node>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct NodeList {
    node: String,
    files: Vec<FileMeta>,
}

/// What this node has put on the shared store; kept by the one thread that publishes.
#[derive(Default)]
pub struct Published {
    /// Uploaded objects no longer listed, and since when.
    unlisted: HashMap<String, Instant>,
    /// The node list last put, so an unchanged one is not put again.
    list: Vec<u8>,
}

/// The other nodes' lists as last read; kept by the one thread that reads them.
#[derive(Default)]
pub struct SeenLists {
    /// Node-list key -> (ETag, its files).
    lists: HashMap<String, (Option<String>, Vec<FileMeta>)>,
}

pub struct SharedStore {
    store: Arc<dyn ObjectStore>,
    reader: SharedReader,
    /// Object keys start with this (no trailing slash; empty for the bucket's root).
    prefix: String,
    node: String,
    /// Object store calls are async; the store's threads are not. Taken at drop, which
    /// may happen inside another runtime, where dropping a runtime would panic.
    runtime: Option<tokio::runtime::Runtime>,
    /// When the other nodes' lists were last read in full (None: not yet since start).
    synced_at: Mutex<Option<Instant>>,
    /// Object keys of this node's files that are uploaded (written by the publisher, read
    /// when a query is sent to machines without this data dir).
    uploaded: Mutex<HashSet<String>>,
}

impl Published {
    /// True while objects wait for their grace period to be deleted.
    pub fn deletes_pending(&self) -> bool {
        !self.unlisted.is_empty()
    }
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The other nodes' files are reported stale (`/readyz` 503) once their lists have not
/// been read for this long: well before their owners delete replaced objects.
const STALE_AFTER: Duration = Duration::from_secs(60);

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("url", &self.reader.url)
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish()
    }
}

fn remote_err(what: &str) -> impl FnOnce(object_store::Error) -> StorageError + '_ {
    move |e| StorageError::Remote(format!("{what}: {e}"))
}

impl SharedStore {
    /// Connect to `[storage]` as `node`. Credentials come from the environment
    /// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), never the config file.
    pub fn connect(cfg: &StorageConfig, node: &str) -> Result<SharedStore> {
        let (bucket, prefix) = cfg.bucket_and_prefix()?;
        let build = || {
            // Bounded retries: a store that is down shows as failing publications and
            // syncs (and a 503 on /readyz) within a minute, and a shutdown never waits
            // minutes for it.
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            };
            // Client options first: they replace any set before (allow_http is one).
            let mut b = AmazonS3Builder::from_env()
                .with_client_options(
                    object_store::ClientOptions::new().with_timeout(Duration::from_secs(60)),
                )
                .with_bucket_name(bucket)
                .with_region(cfg.region.as_deref().unwrap_or("us-east-1"))
                .with_allow_http(cfg.allow_http)
                .with_retry(retry);
            if let Some(endpoint) = &cfg.endpoint {
                b = b.with_endpoint(endpoint);
            }
            b.build().map_err(|e| {
                StorageError::Config(format!(
                    "[storage] (url, endpoint, region, AWS_* environment): {e}"
                ))
            })
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fh-object-store")
            .enable_all()
            .build()
            .map_err(StorageError::io("object store runtime"))?;
        Ok(SharedStore {
            store: Arc::new(build()?),
            // Queries run on their own runtime: their client is their own too, so no
            // connection is tied to a runtime that is not polling it.
            reader: SharedReader {
                url: format!("s3://{bucket}"),
                store: Arc::new(build()?),
            },
            prefix: prefix.to_string(),
            node: node.to_string(),
            runtime: Some(runtime),
            synced_at: Mutex::default(),
            uploaded: Mutex::default(),
        })
    }

    fn block_on<F: Future>(&self, work: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .block_on(work)
    }

    /// The other nodes' files as last read are in the snapshots now.
    pub fn mark_synced(&self) {
        *self.synced_at.lock().expect("shared lock") = Some(Instant::now());
    }

    /// Err while the other nodes' files have not been read since start, or not for
    /// [`STALE_AFTER`].
    pub fn health(&self) -> std::result::Result<(), String> {
        match *self.synced_at.lock().expect("shared lock") {
            None => Err("listing the other nodes' files on the shared object store".into()),
            Some(at) if at.elapsed() > STALE_AFTER => Err(format!(
                "the other nodes' file lists could not be read for {} s (see the log)",
                at.elapsed().as_secs()
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn reader(&self) -> SharedReader {
        self.reader.clone()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    fn node_list_key(&self, node: &str) -> String {
        self.key(&format!("nodes/{node}.json"))
    }

    /// The object key of one of this node's files (`path` is relative to the data dir,
    /// `events/<partition>/<file>`).
    fn object_key(&self, file: &FileMeta) -> String {
        let name = file.path.rsplit('/').next().unwrap_or(&file.path);
        self.key(&format!("events/{}/{}-{name}", file.partition, self.node))
    }

    /// One of this node's files as the other machines read it, by its object key.
    fn as_object(&self, file: &FileMeta, key: String) -> FileMeta {
        FileMeta {
            path: key,
            node: Some(self.node.clone()),
            ..file.clone()
        }
    }

    /// One of this node's files as the other machines read it, once it is uploaded.
    pub fn published(&self, file: &FileMeta) -> Option<FileMeta> {
        let key = self.object_key(file);
        let uploaded = self.uploaded().contains(&key);
        uploaded.then(|| self.as_object(file, key))
    }

    fn uploaded(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.uploaded.lock().expect("shared lock")
    }

    /// Is this object key one of this node's files?
    fn is_own_object(&self, key: &str) -> bool {
        key.rsplit('/')
            .next()
            .is_some_and(|name| name.starts_with(&format!("{}-", self.node)))
    }

    /// At start-up: learn which of this node's objects exist, mark those the local
    /// manifest does not name for deletion after the grace period, then publish the
    /// manifest (uploading what a crash kept from being uploaded).
    pub fn recover(
        &self,
        published: &mut Published,
        manifest: &Manifest,
        data_dir: &Path,
    ) -> Result<()> {
        let events = ObjectPath::from(self.key("events"));
        let keys: Vec<String> = self.block_on(async {
            self.store
                .list(Some(&events))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .map_err(remote_err("listing the shared events"))
        })?;
        let listed: HashSet<String> = manifest.files.iter().map(|f| self.object_key(f)).collect();
        for key in keys.into_iter().filter(|k| self.is_own_object(k)) {
            if !listed.contains(&key) {
                // An upload cut short, or a file compacted away whose delete did not
                // happen: an older list of this node's may still name it, and another
                // node may be reading it, so it waits its grace period like any other.
                published.unlisted.insert(key.clone(), Instant::now());
            }
            self.uploaded().insert(key);
        }
        self.publish(published, manifest, data_dir)
    }

    /// Upload the manifest's files not uploaded yet, put this node's list, and delete the
    /// objects unlisted for longer than the grace period.
    pub fn publish(
        &self,
        published: &mut Published,
        manifest: &Manifest,
        data_dir: &Path,
    ) -> Result<()> {
        let files: Vec<(String, &FileMeta)> = manifest
            .files
            .iter()
            .map(|f| (self.object_key(f), f))
            .collect();
        for (key, file) in &files {
            if !self.uploaded().contains(key) {
                self.block_on(self.upload(&data_dir.join(&file.path), key))?;
                self.uploaded().insert(key.clone());
            }
        }
        let list = NodeList {
            node: self.node.clone(),
            files: (files.iter())
                .map(|(key, f)| self.as_object(f, key.clone()))
                .collect(),
        };
        let body = serde_json::to_vec(&list).expect("node list serialises");
        if published.list != body {
            let list_key = ObjectPath::from(self.node_list_key(&self.node));
            self.block_on(async {
                self.store
                    .put(&list_key, PutPayload::from(body.clone()))
                    .await
                    .map_err(remote_err("putting this node's file list"))
            })?;
            published.list = body;
        }

        let now_listed: HashSet<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
        for key in self.uploaded().iter() {
            if !now_listed.contains(key.as_str()) {
                published
                    .unlisted
                    .entry(key.clone())
                    .or_insert_with(Instant::now);
            }
        }
        published
            .unlisted
            .retain(|k, _| !now_listed.contains(k.as_str()));
        let due: Vec<String> = (published.unlisted.iter())
            .filter(|(_, since)| since.elapsed() >= DELETE_GRACE)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let result = self.block_on(self.store.delete(&ObjectPath::from(key.as_str())));
            match result {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    published.unlisted.remove(&key);
                    self.uploaded().remove(&key);
                }
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "deleting a replaced object failed; retried at the next publication")
                }
            }
        }
        Ok(())
    }

    async fn upload(&self, local: &Path, key: &str) -> Result<()> {
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(StorageError::io(local))?;
        let mut writer =
            object_store::buffered::BufWriter::new(Arc::clone(&self.store), ObjectPath::from(key));
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        if let Err(e) = copied {
            writer.abort().await.ok();
            return Err(StorageError::Remote(format!("uploading {key}: {e}")));
        }
        writer
            .shutdown()
            .await
            .map_err(|e| StorageError::Remote(format!("uploading {key}: {e}")))
    }

    /// The committed files of every other node: list the node lists, fetch those whose
    /// ETag changed since the last call.
    pub fn other_nodes_files(&self, seen: &mut SeenLists) -> Result<Vec<FileMeta>> {
        let nodes = ObjectPath::from(self.key("nodes"));
        let own = self.node_list_key(&self.node);
        let metas: Vec<object_store::ObjectMeta> = self.block_on(async {
            self.store
                .list(Some(&nodes))
                .try_collect()
                .await
                .map_err(remote_err("listing the node lists"))
        })?;
        let present: HashSet<String> = metas.iter().map(|m| m.location.to_string()).collect();
        seen.lists.retain(|k, _| present.contains(k));
        for meta in metas {
            let key = meta.location.to_string();
            if key == own || !key.ends_with(".json") {
                continue;
            }
            if seen
                .lists
                .get(&key)
                .is_some_and(|(etag, _)| etag.is_some() && *etag == meta.e_tag)
            {
                continue;
            }
            let bytes =
                self.block_on(async { self.store.get(&meta.location).await?.bytes().await });
            let bytes = match bytes {
                Ok(b) => b,
                // Gone between the list and the get: the node's files went with it.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(remote_err("reading a node list")(e)),
            };
            let mut list: NodeList = match serde_json::from_slice(&bytes) {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "skipping a node list that is not one; its node's files are not read");
                    continue;
                }
            };
            // Whatever the entries say, they are that node's objects.
            for f in &mut list.files {
                f.node = Some(list.node.clone());
            }
            seen.lists.insert(key, (meta.e_tag, list.files));
        }
        let mut files: Vec<FileMeta> = seen
            .lists
            .values()
            .flat_map(|(_, files)| files.iter().cloned())
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }
}

/// What is committed now for a reader without a running server: the data dir's
/// [`Snapshot::read`](crate::Snapshot::read) plus, with `storage.url`, every other node's
/// committed files, and where to read those. Blocking.
pub fn read_snapshot(
    data_dir: &Path,
    storage: &StorageConfig,
) -> Result<(crate::Snapshot, Option<SharedReader>)> {
    let mut snapshot = crate::Snapshot::read(data_dir)?;
    if storage.url.is_none() {
        return Ok((snapshot, None));
    }
    // A data dir that never ran with `[storage]` has no objects: every list is another's.
    let node = if data_dir.join(NODE_ID_FILE).exists() {
        node_id(data_dir)?
    } else {
        String::new()
    };
    let shared = SharedStore::connect(storage, &node)?;
    let mut files = snapshot.files.to_vec();
    files.extend(shared.other_nodes_files(&mut SeenLists::default())?);
    snapshot.files = Arc::new(files);
    Ok((snapshot, Some(shared.reader())))
}

/// This data dir's node id: generated at the first start and kept in `node_id`.
pub fn node_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(NODE_ID_FILE);
    let valid = |id: &str| {
        id.len() == 13 && id.starts_with('n') && id[1..].chars().all(|c| c.is_ascii_hexdigit())
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if valid(id.trim()) => return Ok(id.trim().to_string()),
        Ok(id) => {
            return Err(StorageError::Corrupt {
                path,
                reason: format!(
                    "{:?} is not a node id (n + 12 hex digits); delete the file to get a new one",
                    id.trim()
                ),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io(&path)(e)),
    }
    // The random tail of a UUIDv7: 48 bits.
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    let id = format!("n{}", &uuid[20..]);
    crate::fsutil::write_atomic(&crate::disk::OsDisk, &path, id.as_bytes())?;
    Ok(id)
}

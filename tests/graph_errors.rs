//! Graph layer: every failure is a typed error that keeps its meaning and names the key.

use pagestore::testing::store_unchecked;
use std::sync::Arc;

/// The start of the message a shared value reports outside a page-out or page-in call.
const OUTSIDE_SESSION: &str = "used outside page_out/page_in";
use pagestore::{
    DataKey, Error, InMemoryPagableStorage, PagableData, PagableStorage, Shared, page_in, page_out,
};
use serde::{Deserialize, Serialize};

#[typetag::serde]
trait Animal: Send + Sync + std::fmt::Debug {
    fn noise(&self) -> String;
}

#[derive(Debug, Serialize, Deserialize)]
struct Dog;

#[typetag::serde(name = "dog")]
impl Animal for Dog {
    fn noise(&self) -> String {
        "woof".into()
    }
}

/// Internally tagged: postcard supports struct impls but not enum impls.
#[typetag::serde(tag = "kind")]
trait Internal: Send + Sync + std::fmt::Debug {}

#[derive(Debug, Serialize, Deserialize)]
struct Thing {
    x: u8,
}

#[typetag::serde(name = "thing")]
impl Internal for Thing {}

#[derive(Debug, Serialize, Deserialize)]
enum Choice {
    A(u32),
}

#[typetag::serde(name = "choice")]
impl Internal for Choice {}

#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    name: String,
    child: Shared<String>,
}

fn storage() -> Arc<InMemoryPagableStorage> {
    Arc::new(InMemoryPagableStorage::new())
}

/// Stores a `Holder` whose child key points nowhere; returns (its key, the missing key).
fn holder_with_missing_child(storage: &InMemoryPagableStorage) -> (DataKey, DataKey) {
    let missing: DataKey = "0123456789abcdef0123456789abcdef".parse().unwrap();
    let root = store_unchecked(
        storage,
        PagableData {
            data: postcard::to_allocvec("name").unwrap(),
            arcs: vec![missing],
        },
    )
    .unwrap();
    (root, missing)
}

fn pagestore_error(err: &anyhow::Error) -> &Error {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not a pagestore::Error: {err:#}"))
}

#[test]
fn shared_outside_a_call_is_a_clear_error_not_a_panic() {
    let value = Holder {
        name: "x".into(),
        child: Shared::new("y".into()),
    };
    let err = serde_json::to_string(&value).unwrap_err();
    assert!(
        err.to_string().contains("outside page_out/page_in"),
        "{err}"
    );
    let err = serde_json::from_str::<Holder>(r#"{"name":"x","child":null}"#).unwrap_err();
    assert!(err.to_string().contains(OUTSIDE_SESSION), "{err}");
}

#[test]
fn a_missing_child_is_not_found_naming_the_child() {
    let storage = storage();
    let child = store_unchecked(
        &storage,
        PagableData {
            data: postcard::to_allocvec("gone").unwrap(),
            arcs: vec![],
        },
    )
    .unwrap();
    let (root, missing) = holder_with_missing_child(&storage);
    let err = page_in::<Holder>(&storage, root).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::NotFound(key) if *key == missing),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains(&missing.to_string()), "{err:#}");
    assert!(
        format!("{err:#}").contains(&format!("child 0 of the node stored under {root}")),
        "names the parent too: {err:#}"
    );
    // The good child alone still pages in.
    let ok: String = page_in(&storage, child).unwrap();
    assert_eq!(ok, "gone");
}

#[test]
fn a_missing_root_is_not_found() {
    let storage = storage();
    let missing: DataKey = "00000000000000000000000000000001".parse().unwrap();
    let err = page_in::<String>(&storage, missing).unwrap_err();
    assert!(Error::is_not_found(&err), "{err:#}");
}

#[test]
fn reading_as_the_wrong_type_names_the_key_and_type() {
    let storage = storage();
    let key = page_out(&storage, &Shared::new(String::from("text"))).unwrap();
    let child = storage.fetch_data_blocking(&key).unwrap().arcs[0];
    // The child holds a string; read it as a u64 pair.
    let err = page_in::<Shared<(u64, u64, u64, u64)>>(&storage, key).unwrap_err();
    match pagestore_error(&err) {
        Error::Deserialize { key, type_name, .. } => {
            assert_eq!(*key, child);
            assert!(type_name.contains("u64"), "{type_name}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(format!("{err:#}").contains(&child.to_string()), "{err:#}");
}

#[test]
fn an_unknown_typetag_name_keeps_typetag_message() {
    let storage = storage();
    // An externally tagged `dyn Animal` record naming an unregistered type: a map of one
    // entry, tag "cat", unit content.
    let mut data = postcard::to_allocvec(&1usize).unwrap(); // map length
    data.extend(postcard::to_allocvec("cat").unwrap());
    let cat = store_unchecked(&storage, PagableData { data, arcs: vec![] }).unwrap();
    let root = store_unchecked(
        &storage,
        PagableData {
            data: vec![],
            arcs: vec![cat],
        },
    )
    .unwrap();
    let err = page_in::<Shared<dyn Animal>>(&storage, root).unwrap_err();
    match pagestore_error(&err) {
        Error::Deserialize { key, reason, .. } => {
            assert_eq!(*key, cat);
            assert!(reason.contains("cat"), "{reason}");
            assert!(
                reason.contains("dog"),
                "typetag lists the known names: {reason}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // And a known one works.
    let good = page_out(&storage, &Shared::from(Arc::new(Dog) as Arc<dyn Animal>)).unwrap();
    let dog: Shared<dyn Animal> = page_in(&storage, good).unwrap();
    assert_eq!(dog.noise(), "woof");
}

#[test]
fn internally_tagged_traits_work_for_structs_and_fail_cleanly_for_enums() {
    let storage = storage();
    let thing: Shared<dyn Internal> = Shared::from(Arc::new(Thing { x: 1 }) as Arc<dyn Internal>);
    let key = page_out(&storage, &thing).unwrap();
    let back: Shared<dyn Internal> = page_in(&storage, key).unwrap();
    assert_eq!(format!("{back:?}"), "Thing { x: 1 }");
    let value: Shared<dyn Internal> = Shared::from(Arc::new(Choice::A(1)) as Arc<dyn Internal>);
    // Serialization may succeed or fail depending on the serializer; page-in cannot work.
    match page_out(&storage, &value) {
        Ok(key) => {
            let err = page_in::<Shared<dyn Internal>>(&storage, key).unwrap_err();
            assert!(
                matches!(pagestore_error(&err), Error::Deserialize { .. }),
                "{err:#}"
            );
        }
        Err(err) => assert!(
            matches!(pagestore_error(&err), Error::Serialize { .. }),
            "{err:#}"
        ),
    }
}

#[test]
fn a_record_with_too_few_or_too_many_child_keys_is_corrupt() {
    let storage = storage();
    let name = postcard::to_allocvec("n").unwrap();
    let no_children = store_unchecked(
        &storage,
        PagableData {
            data: name.clone(),
            arcs: vec![],
        },
    )
    .unwrap();
    let err = page_in::<Holder>(&storage, no_children).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::Corrupt { key, .. } if *key == no_children),
        "{err:#}"
    );
    let leaf = page_out(&storage, &String::from("leaf")).unwrap();
    let extra = store_unchecked(
        &storage,
        PagableData {
            data: name,
            arcs: vec![leaf, leaf],
        },
    )
    .unwrap();
    let err = page_in::<Holder>(&storage, extra).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::Corrupt { key, reason } if *key == extra && reason.contains("2 child keys")),
        "{err:#}"
    );
}

#[test]
fn garbage_and_trailing_bytes_are_deserialize_errors() {
    let storage = storage();
    let mut data = postcard::to_allocvec(&7u32).unwrap();
    data.push(0);
    let trailing = store_unchecked(&storage, PagableData { data, arcs: vec![] }).unwrap();
    let err = page_in::<u32>(&storage, trailing).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::Deserialize { key, reason, .. } if *key == trailing && reason.contains("left over")),
        "{err:#}"
    );
    let garbage = store_unchecked(
        &storage,
        PagableData {
            data: vec![0xff; 3],
            arcs: vec![],
        },
    )
    .unwrap();
    let err = page_in::<String>(&storage, garbage).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::Deserialize { key, .. } if *key == garbage),
        "{err:#}"
    );
}

#[test]
fn a_failing_serialize_keeps_its_message() {
    struct Refuses;
    impl Serialize for Refuses {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refusing on purpose"))
        }
    }
    let storage = storage();
    let err = page_out(&storage, &vec![Shared::new(Refuses)]).unwrap_err();
    match pagestore_error(&err) {
        Error::Serialize { type_name, reason } => {
            assert!(type_name.contains("Refuses"), "{type_name}");
            assert!(reason.contains("refusing on purpose"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_cycle_is_an_error_not_a_hang() {
    use std::sync::Mutex;
    #[derive(Serialize)]
    struct Cell {
        next: Mutex<Option<Shared<Cell>>>,
    }
    let a = Shared::new(Cell {
        next: Mutex::new(None),
    });
    *a.next.lock().unwrap() = Some(a.clone());
    let storage = storage();
    let err = page_out(&storage, &a).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::Serialize { reason, .. } if reason.contains("cycle")),
        "{err:#}"
    );
    // Break the cycle so the test does not leak.
    a.next.lock().unwrap().take();
}

#[test]
fn a_serialize_impl_on_another_thread_loses_the_session() {
    struct Threaded(Shared<u8>);
    impl Serialize for Threaded {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let inner = self.0.clone();
            let result = std::thread::spawn(move || postcard::to_allocvec(&inner).map(drop))
                .join()
                .unwrap();
            match result {
                Ok(()) => serializer.serialize_unit(),
                Err(_) => Err(serde::ser::Error::custom(OUTSIDE_SESSION)),
            }
        }
    }
    let storage = storage();
    let err = page_out(&storage, &Threaded(Shared::new(1))).unwrap_err();
    assert!(
        err.to_string().contains("outside page_out/page_in"),
        "{err:#}"
    );
}

#[tokio::test]
async fn page_in_async_reports_a_missing_child_by_key() {
    let storage = storage();
    let (root, missing) = holder_with_missing_child(&storage);
    let err = pagestore::page_in_async::<Holder>(&storage, root)
        .await
        .unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::NotFound(key) if *key == missing),
        "{err:#}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Random bytes under random child keys: page-in returns an error or a value, never panics.
    #[test]
    fn garbage_records_never_panic(
        records in proptest::collection::vec(
            (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24), proptest::collection::vec(0usize..8, 0..4)),
            1..8,
        ),
    ) {
        #[derive(Debug, Serialize, Deserialize)]
        struct Tree {
            name: String,
            animal: Option<Shared<dyn Animal>>,
            kids: Vec<Shared<Tree>>,
        }
        let storage = storage();
        let mut keys: Vec<DataKey> = Vec::new();
        for (data, picks) in records {
            let arcs = picks.iter().filter_map(|&p| keys.get(p % (keys.len().max(1))).copied()).collect();
            keys.push(store_unchecked(&storage, PagableData { data, arcs }).unwrap());
        }
        for &key in &keys {
            let _ = page_in::<Tree>(&storage, key);
            let _ = page_in::<Shared<dyn Animal>>(&storage, key);
            let _ = page_in::<Vec<Shared<String>>>(&storage, key);
        }
    }
}

/// Maps any error to `None`, as `serde_with::DefaultOnError` does.
fn lenient<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Shared<String>>, D::Error> {
    Ok(Option::<Shared<String>>::deserialize(deserializer).unwrap_or(None))
}

/// A lenient field that swallows a missing child, then a field that is not lenient.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // only deserialized
struct Picky {
    #[serde(deserialize_with = "lenient")]
    soft: Option<Shared<String>>,
    hard: Shared<String>,
}

/// A lenient field that swallows a missing child, then a field that always fails.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // only deserialized
struct Fussy {
    #[serde(deserialize_with = "lenient")]
    soft: Option<Shared<String>>,
    #[serde(deserialize_with = "refuse")]
    number: u32,
}

fn refuse<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let number = u32::deserialize(deserializer)?;
    Err(serde::de::Error::custom(format!(
        "refusing {number} on purpose"
    )))
}

const KEY_A: &str = "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";
const KEY_B: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";

/// Was "not found: A": the swallowed error stayed stashed and was reported in place of B's.
#[test]
fn a_swallowed_missing_child_is_not_reported_for_another_missing_child() {
    let storage = storage();
    let (a, b): (DataKey, DataKey) = (KEY_A.parse().unwrap(), KEY_B.parse().unwrap());
    // `Picky { soft: Some(A), hard: B }` one level down, under a `Shared<Picky>` root.
    let picky = store_unchecked(
        &storage,
        PagableData {
            data: postcard::to_allocvec(&Some(())).unwrap(),
            arcs: vec![a, b],
        },
    )
    .unwrap();
    let root = store_unchecked(
        &storage,
        PagableData {
            data: vec![],
            arcs: vec![picky],
        },
    )
    .unwrap();
    let err = page_in::<Shared<Picky>>(&storage, root).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::NotFound(key) if *key == b),
        "{err:#}"
    );
    let text = format!("{err:#}");
    assert!(text.contains(KEY_B), "{text}");
    assert!(!text.contains(KEY_A), "{text}");
}

/// Was "not found: A": the swallowed error stayed stashed and replaced the impl's own message.
#[test]
fn a_swallowed_missing_child_is_not_reported_for_a_custom_error() {
    let storage = storage();
    let a: DataKey = KEY_A.parse().unwrap();
    let root = store_unchecked(
        &storage,
        PagableData {
            data: postcard::to_allocvec(&(Some(()), 7u32)).unwrap(),
            arcs: vec![a],
        },
    )
    .unwrap();
    let err = page_in::<Fussy>(&storage, root).unwrap_err();
    match pagestore_error(&err) {
        Error::Deserialize { key, reason, .. } => {
            assert_eq!(*key, root);
            assert!(reason.contains("refusing 7 on purpose"), "{reason}");
        }
        other => panic!("unexpected {other:?}: {err:#}"),
    }
    assert!(!format!("{err:#}").contains(KEY_A), "{err:#}");
}

/// A typetag impl holding a shared value whose key points nowhere.
#[derive(Debug, Serialize, Deserialize)]
struct Kennel {
    name: Shared<String>,
}

#[typetag::serde(name = "kennel")]
impl Animal for Kennel {
    fn noise(&self) -> String {
        format!("{}: woof", self.name)
    }
}

#[test]
fn a_missing_child_inside_a_trait_object_is_not_found() {
    let storage = storage();
    let good = page_out(
        &storage,
        &Shared::from(Arc::new(Kennel {
            name: Shared::new("rex".into()),
        }) as Arc<dyn Animal>),
    )
    .unwrap();
    let kennel = storage.fetch_data_blocking(&good).unwrap().arcs[0];
    let data = storage.fetch_data_blocking(&kennel).unwrap().data.clone();
    let missing: DataKey = KEY_B.parse().unwrap();
    let broken = store_unchecked(
        &storage,
        PagableData {
            data,
            arcs: vec![missing],
        },
    )
    .unwrap();
    let root = store_unchecked(
        &storage,
        PagableData {
            data: vec![],
            arcs: vec![broken],
        },
    )
    .unwrap();
    let err = page_in::<Shared<dyn Animal>>(&storage, root).unwrap_err();
    assert!(
        matches!(pagestore_error(&err), Error::NotFound(key) if *key == missing),
        "{err:#}"
    );
}

#[test]
fn a_page_in_error_names_the_root_its_type_and_the_missing_key() {
    let storage = storage();
    let (holder, missing) = holder_with_missing_child(&storage);
    let root = store_unchecked(
        &storage,
        PagableData {
            data: postcard::to_allocvec(&1usize).unwrap(), // a Vec of one
            arcs: vec![holder],
        },
    )
    .unwrap();
    let err = page_in::<Vec<Shared<Holder>>>(&storage, root).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&root.to_string()), "names the root: {text}");
    assert!(
        text.contains(std::any::type_name::<Vec<Shared<Holder>>>()),
        "names the type asked for: {text}"
    );
    assert!(
        text.contains(&missing.to_string()),
        "names the missing key: {text}"
    );
    assert!(
        matches!(pagestore_error(&err), Error::NotFound(key) if *key == missing),
        "{text}"
    );
}

#[tokio::test]
async fn a_page_in_async_error_names_the_root_and_its_type() {
    let storage = storage();
    let (root, missing) = holder_with_missing_child(&storage);
    let err = pagestore::page_in_async::<Holder>(&storage, root)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&root.to_string()), "{text}");
    assert!(text.contains(std::any::type_name::<Holder>()), "{text}");
    assert!(text.contains(&missing.to_string()), "{text}");
}

/// A type that pages in through a chain of optional shared links.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // only deserialized
struct Loop {
    next: Option<Shared<Loop>>,
}

/// A record by hand: its data and its child keys.
type Record = (Vec<u8>, Vec<DataKey>);

/// The record of a `Loop` whose next link is its one child.
fn link_to(next: DataKey) -> Record {
    (postcard::to_allocvec(&Some(())).unwrap(), vec![next])
}

/// The record of a `Shared<Loop>` (no bytes, one child).
fn shared_of(child: DataKey) -> Record {
    (vec![], vec![child])
}

/// Writes `records` into a fresh SQLite store's table by hand — as another program could,
/// since nothing forces a key to be its content's hash — and reopens it without
/// verify-on-read.
fn sqlite_with_records(
    dir: &std::path::Path,
    records: &[(DataKey, Record)],
) -> Arc<pagestore::SqliteBackedPagableStorage> {
    // The legacy rowid layout: a table with a `key` column, written by plain SQL.
    drop(
        pagestore::SqliteOptions::default()
            .table_layout(pagestore::TableLayout::Rowid)
            .open(dir)
            .unwrap(),
    );
    let db = rusqlite::Connection::open(dir.join("pagable.db")).unwrap();
    // Record format: u64_le(data.len()) ‖ u64_le(arcs.len()) ‖ data ‖ 16-byte child keys.
    for (key, (data, arcs)) in records {
        let mut value = Vec::new();
        value.extend((data.len() as u64).to_le_bytes());
        value.extend((arcs.len() as u64).to_le_bytes());
        value.extend(data);
        for arc in arcs {
            value.extend(arc.as_bytes());
        }
        db.execute(
            "INSERT INTO pagable_data (key, value) VALUES (?1, ?2)",
            rusqlite::params![key.as_bytes().to_vec(), value],
        )
        .unwrap();
    }
    drop(db);
    Arc::new(
        pagestore::SqliteOptions::default()
            .verify_on_read(false)
            .open(dir)
            .unwrap(),
    )
}

/// Runs `f` on its own thread; a hang becomes a failure after a generous timeout.
fn within_timeout<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(f()).unwrap());
    result
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("page-in hung (it waited for its own load)")
}

fn assert_cycle_at(err: &anyhow::Error, at: DataKey) {
    match pagestore_error(err) {
        Error::Corrupt { key, reason } => {
            assert_eq!(*key, at, "{err:#}");
            assert!(reason.contains("cycle"), "{reason}");
        }
        other => panic!("unexpected {other:?}: {err:#}"),
    }
    assert!(format!("{err:#}").contains(&at.to_string()), "{err:#}");
}

/// Was a deadlock: the page-in waited on the load lock it held itself.
#[test]
fn a_stored_cycle_is_an_error_naming_the_key_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let [k1, k2, top] = [0x11, 0x22, 0x33].map(|b| DataKey::from_bytes([b; 16]).unwrap());
    let storage = sqlite_with_records(
        dir.path(),
        &[(k1, link_to(k2)), (k2, link_to(k1)), (top, shared_of(k1))],
    );
    // From the root: K1 (the root) -> K2 -> K1.
    let err = within_timeout({
        let storage = Arc::clone(&storage);
        move || page_in::<Loop>(&storage, k1).unwrap_err()
    });
    assert_cycle_at(&err, k1);
    // Below the root, where both keys load through the arc cache: top -> K1 -> K2 -> K1.
    let err = within_timeout({
        let storage = Arc::clone(&storage);
        move || page_in::<Shared<Loop>>(&storage, top).unwrap_err()
    });
    assert_cycle_at(&err, k1);
    // page_in_async prefetches the records first: the cycle ends its walk, then the same error.
    let err = within_timeout({
        let storage = Arc::clone(&storage);
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime
                .block_on(pagestore::page_in_async::<Shared<Loop>>(&storage, top))
                .unwrap_err()
        }
    });
    assert_cycle_at(&err, k1);
}

#[test]
fn a_stored_self_loop_is_an_error_naming_the_key_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let [k1, top] = [0x11, 0x33].map(|b| DataKey::from_bytes([b; 16]).unwrap());
    let storage = sqlite_with_records(dir.path(), &[(k1, link_to(k1)), (top, shared_of(k1))]);
    let err = within_timeout({
        let storage = Arc::clone(&storage);
        move || page_in::<Loop>(&storage, k1).unwrap_err()
    });
    assert_cycle_at(&err, k1);
    let err = within_timeout({
        let storage = Arc::clone(&storage);
        move || page_in::<Shared<Loop>>(&storage, top).unwrap_err()
    });
    assert_cycle_at(&err, k1);
}

thread_local! {
    /// What `Nested` pages in from inside its `Deserialize` impl.
    static NESTED: std::cell::RefCell<Option<(Arc<InMemoryPagableStorage>, DataKey)>> =
        const { std::cell::RefCell::new(None) };
}

/// A value whose `Deserialize` impl runs a page-in of its own, and keeps its outcome.
struct Nested(Result<String, String>);

impl<'de> Deserialize<'de> for Nested {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u8::deserialize(deserializer)?;
        let (storage, key) = NESTED.with(|nested| nested.borrow().clone()).unwrap();
        Ok(Nested(
            page_in::<String>(&storage, key).map_err(|err| format!("{err:#}")),
        ))
    }
}

#[derive(Deserialize)]
struct Outer {
    nested: Shared<Nested>,
    after: Shared<String>,
}

/// A page-in nested in a `Deserialize` impl sees the outer one's path: asking for a key the
/// thread is paging in is a cycle (not a wait), anything else works, and the outer page-in
/// goes on afterwards.
#[test]
fn a_nested_page_in_shares_the_thread_s_path() {
    let storage = storage();
    let side = page_out(&storage, &String::from("side")).unwrap();
    let nested = store_unchecked(
        &storage,
        PagableData {
            data: vec![7],
            arcs: vec![],
        },
    )
    .unwrap();
    let after = page_out(&storage, &String::from("after")).unwrap();
    let outer = store_unchecked(
        &storage,
        PagableData {
            data: vec![],
            arcs: vec![nested, after],
        },
    )
    .unwrap();
    for (asked, expect_cycle) in [(side, false), (outer, true)] {
        NESTED.with(|slot| *slot.borrow_mut() = Some((Arc::clone(&storage), asked)));
        let back: Outer = page_in(&storage, outer).unwrap();
        match &back.nested.0 {
            Ok(text) => assert!(!expect_cycle && text == "side", "{text}"),
            Err(err) => assert!(
                expect_cycle && err.contains("cycle") && err.contains(&outer.to_string()),
                "{err}"
            ),
        }
        assert_eq!(*back.after, "after");
        drop(back);
        storage.release_memory();
    }
}

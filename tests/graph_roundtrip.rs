//! Graph layer: round trips keep values and sharing; dedup; polymorphism through typetag.

use std::collections::BTreeMap;
use std::sync::Arc;

use pagestore::{InMemoryPagableStorage, PagableStorage, Shared, page_in, page_out};
use serde::{Deserialize, Serialize};

#[typetag::serde]
trait Shape: Send + Sync + std::fmt::Debug {
    fn area(&self) -> f64;
    fn name(&self) -> String;
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Circle {
    r: f64,
}

#[typetag::serde(name = "circle")]
impl Shape for Circle {
    fn area(&self) -> f64 {
        3.0 * self.r * self.r
    }
    fn name(&self) -> String {
        "circle".into()
    }
}

/// A typetag impl that itself holds shared values.
#[derive(Debug, Serialize, Deserialize)]
struct Group {
    parts: Vec<Shared<dyn Shape>>,
    label: Shared<String>,
}

#[typetag::serde(name = "group")]
impl Shape for Group {
    fn area(&self) -> f64 {
        self.parts.iter().map(|p| p.area()).sum()
    }
    fn name(&self) -> String {
        format!("group {}", self.label)
    }
}

/// Adjacently tagged: works with postcard.
#[typetag::serde(tag = "type", content = "value")]
trait Adjacent: Send + Sync {
    fn get(&self) -> u32;
}

#[derive(Serialize, Deserialize)]
struct Seven;

#[typetag::serde(name = "seven")]
impl Adjacent for Seven {
    fn get(&self) -> u32 {
        7
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Node {
    label: String,
    shape: Shared<dyn Shape>,
    kids: Vec<Shared<Node>>,
}

fn storage() -> Arc<InMemoryPagableStorage> {
    Arc::new(InMemoryPagableStorage::new())
}

fn circle(r: f64) -> Shared<dyn Shape> {
    Shared::from(Arc::new(Circle { r }) as Arc<dyn Shape>)
}

#[test]
fn the_issue_example_round_trips_with_sharing() {
    let storage = storage();
    let shape = circle(1.0);
    let shared_kid = Shared::new(Node {
        label: "kid".into(),
        shape: shape.clone(),
        kids: vec![],
    });
    let root = Node {
        label: "root".into(),
        shape: shape.clone(),
        kids: vec![shared_kid.clone(), shared_kid.clone()],
    };
    let key = page_out(&storage, &root).unwrap();
    // root, kid, circle
    assert_eq!(storage.len(), 3);
    let back: Node = page_in(&storage, key).unwrap();
    assert_eq!(back.label, "root");
    assert!(Shared::ptr_eq(&back.kids[0], &back.kids[1]));
    assert!(Shared::ptr_eq(&back.shape, &back.kids[0].shape));
    assert_eq!(back.kids[0].shape.area(), 3.0);
    // The root node's children are the circle and the kid twice, in serialization order.
    let record = storage.fetch_data_blocking(&key).unwrap();
    assert_eq!(record.arcs.len(), 3);
    assert_eq!(record.arcs[1], record.arcs[2]);
}

#[test]
fn equal_content_from_different_arcs_is_one_entry_and_dedup_counts_hold() {
    let storage = storage();
    // 1000 leaves over 10 distinct values, each its own Arc.
    let leaves: Vec<Shared<u64>> = (0..1000).map(|i| Shared::new(i % 10)).collect();
    let key = page_out(&storage, &leaves).unwrap();
    assert_eq!(storage.len(), 10 + 1, "10 leaf entries and the root");
    let back: Vec<Shared<u64>> = page_in(&storage, key).unwrap();
    assert_eq!(back.len(), 1000);
    for (i, leaf) in back.iter().enumerate() {
        assert_eq!(**leaf, i as u64 % 10);
    }
    // Same key, same entry: paged in once, so equal content comes back as one Arc.
    assert!(Shared::ptr_eq(&back[0], &back[10]));
}

#[test]
fn second_page_in_reuses_live_values() {
    let storage = storage();
    let leaf = Shared::new(String::from("leaf"));
    let key = page_out(&storage, &vec![leaf.clone(), leaf]).unwrap();
    let first: Vec<Shared<String>> = page_in(&storage, key).unwrap();
    let second: Vec<Shared<String>> = page_in(&storage, key).unwrap();
    assert!(Shared::ptr_eq(&first[0], &second[1]));
    drop((first, second));
    let third: Vec<Shared<String>> = page_in(&storage, key).unwrap();
    assert_eq!(*third[0], "leaf");
}

#[test]
fn arc_of_a_type_and_of_its_trait_object_are_two_entries() {
    let storage = storage();
    let concrete = Arc::new(Circle { r: 2.0 });
    let as_dyn: Arc<dyn Shape> = concrete.clone();
    assert_eq!(
        Arc::as_ptr(&concrete) as *const u8,
        Arc::as_ptr(&as_dyn) as *const u8,
        "one allocation"
    );
    let pair = (Shared::from(concrete), Shared::from(as_dyn));
    let key = page_out(&storage, &pair).unwrap();
    assert_eq!(
        storage.len(),
        3,
        "root, the Circle view and the dyn Shape view"
    );
    let (c, s): (Shared<Circle>, Shared<dyn Shape>) = page_in(&storage, key).unwrap();
    assert_eq!(*c, Circle { r: 2.0 });
    assert_eq!(s.name(), "circle");
}

#[test]
fn nested_shared_inside_typetag_impls() {
    let storage = storage();
    let label = Shared::new(String::from("pair"));
    let unit = circle(1.0);
    let group: Shared<dyn Shape> = Shared::from(Arc::new(Group {
        parts: vec![unit.clone(), unit.clone(), circle(2.0)],
        label: label.clone(),
    }) as Arc<dyn Shape>);
    let outer: Shared<dyn Shape> = Shared::from(Arc::new(Group {
        parts: vec![group.clone(), unit],
        label,
    }) as Arc<dyn Shape>);
    let key = page_out(&storage, &(outer, group)).unwrap();
    let (outer, group): (Shared<dyn Shape>, Shared<dyn Shape>) = page_in(&storage, key).unwrap();
    assert_eq!(outer.name(), "group pair");
    assert_eq!(group.area(), 3.0 + 3.0 + 12.0);
    assert_eq!(outer.area(), 18.0 + 3.0);
}

#[test]
fn adjacently_tagged_traits_work() {
    let storage = storage();
    let seven: Shared<dyn Adjacent> = Shared::from(Arc::new(Seven) as Arc<dyn Adjacent>);
    let key = page_out(&storage, &seven).unwrap();
    let back: Shared<dyn Adjacent> = page_in(&storage, key).unwrap();
    assert_eq!(back.get(), 7);
}

#[test]
fn unsized_and_container_fields() {
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Bag {
        text: Shared<str>,
        bytes: Shared<[u8]>,
        map: BTreeMap<String, Shared<Vec<u32>>>,
        maybe: Option<Shared<u8>>,
    }
    let storage = storage();
    let list = Shared::new(vec![1, 2, 3]);
    let bag = Bag {
        text: Shared::from(Arc::<str>::from("hello")),
        bytes: Shared::from(Arc::<[u8]>::from(&b"bytes"[..])),
        map: BTreeMap::from([("a".into(), list.clone()), ("b".into(), list)]),
        maybe: None,
    };
    let key = page_out(&storage, &bag).unwrap();
    let back: Bag = page_in(&storage, key).unwrap();
    assert_eq!(back, bag);
    assert!(Shared::ptr_eq(&back.map["a"], &back.map["b"]));
}

#[test]
fn arc_fields_through_the_with_module() {
    #[derive(Serialize, Deserialize)]
    struct Doc {
        #[serde(with = "pagestore::graph::arc")]
        body: Arc<String>,
        #[serde(with = "pagestore::graph::arc")]
        shape: Arc<dyn Shape>,
    }
    let storage = storage();
    let body = Arc::new(String::from("text"));
    let shape: Arc<dyn Shape> = Arc::new(Circle { r: 1.0 });
    let docs = vec![
        Doc {
            body: body.clone(),
            shape: shape.clone(),
        },
        Doc { body, shape },
    ];
    let key = page_out(&storage, &docs).unwrap();
    assert_eq!(storage.len(), 3);
    let back: Vec<Doc> = page_in(&storage, key).unwrap();
    assert!(Arc::ptr_eq(&back[0].body, &back[1].body));
    assert!(Arc::ptr_eq(&back[0].shape, &back[1].shape));
}

#[cfg(feature = "serde_with")]
#[test]
fn arc_fields_inside_containers_through_as_shared() {
    use pagestore::graph::AsShared;
    use serde_with::serde_as;

    #[serde_as]
    #[derive(Serialize, Deserialize)]
    struct Index {
        #[serde_as(as = "BTreeMap<_, Vec<AsShared>>")]
        by_name: BTreeMap<String, Vec<Arc<String>>>,
        #[serde_as(as = "Option<AsShared>")]
        first: Option<Arc<String>>,
    }
    let storage = storage();
    let word = Arc::new(String::from("word"));
    let index = Index {
        by_name: BTreeMap::from([("w".into(), vec![word.clone(), word.clone()])]),
        first: Some(word),
    };
    let key = page_out(&storage, &index).unwrap();
    assert_eq!(storage.len(), 2);
    let back: Index = page_in(&storage, key).unwrap();
    assert!(Arc::ptr_eq(
        &back.by_name["w"][1],
        back.first.as_ref().unwrap()
    ));
}

#[test]
fn keys_are_content_addresses_independent_of_sharing_in_memory() {
    // The same logical graph built with and without sharing in memory has one key.
    let a = storage();
    let leaf = Shared::new(5u32);
    let shared = page_out(&a, &vec![leaf.clone(), leaf]).unwrap();
    let copied = page_out(&a, &vec![Shared::new(5u32), Shared::new(5u32)]).unwrap();
    assert_eq!(shared, copied);
    assert_eq!(a.len(), 2);
}

#[test]
fn works_through_a_dyn_storage_handle() {
    let storage: Arc<dyn PagableStorage> = Arc::new(InMemoryPagableStorage::new());
    let key = page_out(&storage, &Shared::new(1u8)).unwrap();
    let back: Shared<u8> = page_in(&storage, key).unwrap();
    assert_eq!(*back, 1);
}

/// A root whose two kids are one shared node, which shares the root's shape.
fn one_kid_twice() -> Node {
    let shape = circle(1.0);
    let kid = Shared::new(Node {
        label: "kid".into(),
        shape: shape.clone(),
        kids: vec![],
    });
    Node {
        label: "root".into(),
        shape,
        kids: vec![kid.clone(), kid],
    }
}

#[tokio::test]
async fn page_in_async_matches_page_in() {
    let storage = storage();
    let root = one_kid_twice();
    let key = page_out(&storage, &root).unwrap();
    let back: Node = pagestore::page_in_async(&storage, key).await.unwrap();
    assert!(Shared::ptr_eq(&back.kids[0], &back.kids[1]));
    assert!(Shared::ptr_eq(&back.shape, &back.kids[1].shape));
}

/// A storage implemented directly (the seed's way), delegating to the in-memory one: it
/// records the order of `store_data` calls and counts the arc-cache hooks the graph layer uses.
#[derive(Default)]
struct Recording {
    inner: InMemoryPagableStorage,
    order: std::sync::Mutex<Vec<pagestore::PagableData>>,
    fetch_arc_calls: std::sync::atomic::AtomicUsize,
    deserialized_calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl PagableStorage for Recording {
    fn store_data(&self, data: pagestore::PagableData) -> anyhow::Result<pagestore::DataKey> {
        self.order.lock().unwrap().push(data.clone());
        self.inner.store_data(data)
    }
    fn flush(&self) -> anyhow::Result<()> {
        self.inner.flush()
    }
    fn fetch_data_blocking(
        &self,
        key: &pagestore::DataKey,
    ) -> anyhow::Result<Arc<pagestore::PagableData>> {
        self.inner.fetch_data_blocking(key)
    }
    async fn fetch_data(
        &self,
        key: &pagestore::DataKey,
    ) -> anyhow::Result<Arc<pagestore::PagableData>> {
        self.inner.fetch_data(key).await
    }
    fn fetch_arc_or_data_blocking(
        &self,
        type_id: &std::any::TypeId,
        key: &pagestore::DataKey,
    ) -> anyhow::Result<either::Either<Box<dyn pagestore::ArcEraseDyn>, Arc<pagestore::PagableData>>>
    {
        self.fetch_arc_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.fetch_arc_or_data_blocking(type_id, key)
    }
    fn on_arc_deserialized(
        &self,
        type_id: std::any::TypeId,
        key: pagestore::DataKey,
        arc: Box<dyn pagestore::ArcEraseDyn>,
    ) -> Option<Box<dyn pagestore::ArcEraseDyn>> {
        self.deserialized_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.on_arc_deserialized(type_id, key, arc)
    }
    fn schedule_for_paging(&self, arc: Box<dyn pagestore::ArcEraseDyn>) {
        self.inner.schedule_for_paging(arc)
    }
    fn session_context(&self) -> &pagestore::SessionContext {
        self.inner.session_context()
    }
}

#[test]
fn children_are_stored_before_parents_and_each_content_once() {
    let storage = Arc::new(Recording::default());
    let shape = circle(1.0);
    let mut level: Vec<Shared<Node>> = vec![];
    for depth in 0..5 {
        let kids = level.clone();
        level = (0..3)
            .map(|i| {
                Shared::new(Node {
                    label: format!("{depth}-{}", i % 2),
                    shape: shape.clone(),
                    kids: kids.clone(),
                })
            })
            .collect();
    }
    let key = page_out(&storage, &level).unwrap();
    let order = storage.order.lock().unwrap();
    let mut stored = std::collections::HashSet::new();
    for data in order.iter() {
        for child in &data.arcs {
            assert!(
                stored.contains(child),
                "a child was stored after its parent"
            );
        }
        assert!(
            stored.insert(data.compute_key()),
            "stored twice in one call"
        );
    }
    assert_eq!(
        order.last().unwrap().compute_key(),
        key,
        "the root is stored last"
    );
    // Two distinct labels per level (i % 2), five levels, the shape and the root.
    assert_eq!(order.len(), 2 * 5 + 1 + 1);
}

#[test]
fn page_in_goes_through_the_storage_s_own_arc_hooks() {
    use std::sync::atomic::Ordering::Relaxed;
    let storage = Arc::new(Recording::default());
    let root = one_kid_twice();
    let key = page_out(&storage, &root).unwrap();
    let back: Node = page_in(&storage, key).unwrap();
    assert!(Shared::ptr_eq(&back.kids[0], &back.kids[1]));
    // Two shared values (the kid and the shape), each looked up and then offered once.
    assert_eq!(storage.fetch_arc_calls.load(Relaxed), 2);
    assert_eq!(storage.deserialized_calls.load(Relaxed), 2);
    // A second page-in while the first is alive gets the live values from the hooks.
    let again: Node = page_in(&storage, key).unwrap();
    assert!(Shared::ptr_eq(&back.kids[0], &again.kids[0]));
    assert_eq!(
        storage.deserialized_calls.load(Relaxed),
        2,
        "nothing deserialized again"
    );
}

/// A node whose serializations are counted.
#[derive(Deserialize)]
struct Counted {
    label: String,
    kids: Vec<Shared<Counted>>,
}

static SERIALIZED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Serialize for Counted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SERIALIZED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (&self.label, &self.kids).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CountedWire {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (label, kids) = <(String, Vec<Shared<Counted>>)>::deserialize(d)?;
        Ok(CountedWire(Counted { label, kids }))
    }
}

struct CountedWire(Counted);

#[test]
fn re_paging_an_edited_graph_serializes_only_the_changed_spine() {
    use std::sync::atomic::Ordering::SeqCst;
    let storage = Arc::new(InMemoryPagableStorage::new());
    // A tree of 3 levels, 4 wide: 1 + 4 + 16 + 64 nodes below the root list.
    fn tree(depth: u32, label: &str) -> Shared<Counted> {
        let kids = if depth == 0 {
            vec![]
        } else {
            (0..4)
                .map(|i| tree(depth - 1, &format!("{label}.{i}")))
                .collect()
        };
        Shared::new(Counted {
            label: label.into(),
            kids,
        })
    }
    let root = tree(3, "r");
    SERIALIZED.store(0, SeqCst);
    let first = page_out(&storage, &root).unwrap();
    assert_eq!(SERIALIZED.load(SeqCst), 85, "every node once");

    // Unchanged: the root is a known shared value, so nothing is serialized.
    SERIALIZED.store(0, SeqCst);
    assert_eq!(page_out(&storage, &root).unwrap(), first);
    assert_eq!(SERIALIZED.load(SeqCst), 0);

    // Edit one leaf: a new leaf and new nodes on its path to the root; the rest is known.
    let r0 = &root.kids[0];
    let r00 = &r0.kids[0];
    let new_leaf = Shared::new(Counted {
        label: "edited".into(),
        kids: vec![],
    });
    let mut r00_kids = r00.kids.clone();
    r00_kids[1] = new_leaf;
    let new_r00 = Shared::new(Counted {
        label: r00.label.clone(),
        kids: r00_kids,
    });
    let mut r0_kids = r0.kids.clone();
    r0_kids[0] = new_r00;
    let new_r0 = Shared::new(Counted {
        label: r0.label.clone(),
        kids: r0_kids,
    });
    let mut root_kids = root.kids.clone();
    root_kids[0] = new_r0;
    let edited = Shared::new(Counted {
        label: root.label.clone(),
        kids: root_kids,
    });
    SERIALIZED.store(0, SeqCst);
    let second = page_out(&storage, &*edited).unwrap();
    assert_eq!(
        SERIALIZED.load(SeqCst),
        4,
        "the edited leaf, its two ancestors and the root"
    );
    assert_ne!(second, first);

    // The keys are those a fresh store computes.
    let fresh = Arc::new(InMemoryPagableStorage::new());
    assert_eq!(page_out(&fresh, &*edited).unwrap(), second);

    // A paged-in graph is known too: paging it out again serializes only the root.
    drop((root, edited));
    let back: CountedWire = page_in(&storage, second).unwrap();
    SERIALIZED.store(0, SeqCst);
    assert_eq!(page_out(&storage, &back.0).unwrap(), second);
    assert_eq!(SERIALIZED.load(SeqCst), 1);
}

//! Graph layer: deep graphs page out, in and drop without overflowing the stack.

use pagestore::testing::store_unchecked;
use std::cell::Cell;
use std::sync::Arc;

use pagestore::{
    DataKey, InMemoryPagableStorage, PagableStorage, Shared, drop_deep, page_in, page_out,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Link {
    value: u32,
    next: Option<Shared<Link>>,
}

/// The chain length: a million, as the issue asks; `PAGESTORE_CHAIN_LEN` overrides it.
fn chain_len() -> u32 {
    std::env::var("PAGESTORE_CHAIN_LEN")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000)
}

fn chain(len: u32) -> Link {
    let mut link = Link {
        value: 0,
        next: None,
    };
    for value in 1..len {
        link = Link {
            value,
            next: Some(Shared::new(link)),
        };
    }
    link
}

#[test]
fn a_million_long_chain_pages_out_in_and_drops() {
    let len = chain_len();
    let storage = Arc::new(InMemoryPagableStorage::new());
    let original = chain(len);
    let key = page_out(&storage, &original).unwrap();
    assert_eq!(storage.len(), len as usize);
    drop_deep(original).unwrap();

    let back: Link = page_in(&storage, key).unwrap();
    let mut expected = len - 1;
    let mut at = &back;
    while let Some(next) = &at.next {
        assert_eq!(at.value, expected);
        expected -= 1;
        at = next;
    }
    assert_eq!((at.value, expected), (0, 0), "every link came back");

    // A second page-in while the first is alive reuses every link.
    let again: Link = page_in(&storage, key).unwrap();
    assert!(Shared::ptr_eq(
        back.next.as_ref().unwrap(),
        again.next.as_ref().unwrap()
    ));
    // `again` shares every link with `back`: dropping it only decrements their counts.
    drop(again);
    drop_deep(back).unwrap();
    storage.release_memory();
    assert_eq!(storage.arc_cache_len(), 0, "every link was freed");

    // Page-in recurses once per link, on a stack that grows: a small thread works as well.
    let storage2 = Arc::clone(&storage);
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let back: Link = page_in(&storage2, key).unwrap();
            assert_eq!(back.value, len - 1);
            drop_deep(back).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_deep_chain_pages_in_on_a_small_thread_stack() {
    let storage = Arc::new(InMemoryPagableStorage::new());
    let original = chain(20_000);
    let key = page_out(&storage, &original).unwrap();
    drop_deep(original).unwrap();
    let storage2 = Arc::clone(&storage);
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let back: Link = page_in(&storage2, key).unwrap();
            assert_eq!(back.value, 19_999);
            drop_deep(back).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_lenient_deserializer_keeps_every_link() {
    /// Maps any error to `None`, as `serde_with::DefaultOnError` does.
    fn lenient<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Shared<Lenient>>, D::Error> {
        Ok(Option::<Shared<Lenient>>::deserialize(deserializer).unwrap_or(None))
    }
    #[derive(Serialize, Deserialize)]
    struct Lenient {
        value: u32,
        #[serde(deserialize_with = "lenient")]
        next: Option<Shared<Lenient>>,
    }
    let storage = Arc::new(InMemoryPagableStorage::new());
    let mut chain = Lenient {
        value: 0,
        next: None,
    };
    for value in 1..1_000 {
        chain = Lenient {
            value,
            next: Some(Shared::new(chain)),
        };
    }
    let key = page_out(&storage, &chain).unwrap();
    let back: Lenient = page_in(&storage, key).unwrap();
    let mut length = 1;
    let mut at = &back;
    while let Some(next) = &at.next {
        length += 1;
        at = next;
    }
    assert_eq!(length, 1_000, "no link was dropped");
}

/// A record stored by hand: `data` are the postcard bytes, `arcs` the child keys in order.
fn store(storage: &InMemoryPagableStorage, data: Vec<u8>, arcs: Vec<DataKey>) -> DataKey {
    store_unchecked(storage, pagestore::PagableData { data, arcs }).unwrap()
}

/// A key nothing is stored under.
const MISSING: DataKey = DataKey::from_bytes([0xab; 16]).unwrap();

thread_local! {
    /// Calls of `Soft`'s `Deserialize` on this thread (a page-in runs on its caller's thread).
    static SOFT_CALLS: Cell<usize> = const { Cell::new(0) };
}

/// Maps any error to `None`, as `serde_with::DefaultOnError` does.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<Shared<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Send + Sync + 'static,
    Box<T>: serde::de::DeserializeOwned,
{
    Ok(Option::<Shared<T>>::deserialize(deserializer).unwrap_or(None))
}

/// A link whose two shared fields are both lenient; counts its deserializations.
#[derive(Debug, Serialize)]
struct Soft {
    value: u32,
    next: Option<Shared<Soft>>,
    extra: Option<Shared<String>>,
}

impl<'de> Deserialize<'de> for Soft {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            value: u32,
            #[serde(deserialize_with = "lenient")]
            next: Option<Shared<Soft>>,
            #[serde(deserialize_with = "lenient")]
            extra: Option<Shared<String>>,
        }
        SOFT_CALLS.with(|calls| calls.set(calls.get() + 1));
        let raw = Raw::deserialize(deserializer)?;
        Ok(Soft {
            value: raw.value,
            next: raw.next,
            extra: raw.extra,
        })
    }
}

/// Stores a chain of `len` `Soft` links by hand (the root is depth 0); the links at the depths
/// `missing_extra` says have an `extra` child whose key points nowhere. Returns the root key.
fn soft_chain(
    storage: &InMemoryPagableStorage,
    len: u32,
    missing_extra: impl Fn(u32) -> bool,
) -> DataKey {
    let mut below: Option<DataKey> = None;
    for depth in (0..len).rev() {
        let extra = missing_extra(depth).then_some(MISSING);
        // `Shared` writes no bytes: a link is its value and the two `Option` tags.
        let data = postcard::to_allocvec(&(depth, below.map(|_| ()), extra.map(|_| ()))).unwrap();
        let arcs = below.into_iter().chain(extra).collect();
        below = Some(store(storage, data, arcs));
    }
    below.unwrap()
}

/// (value, has next, has extra) of every link, root first.
fn soft_links(root: &Soft) -> Vec<(u32, bool, bool)> {
    let mut links = Vec::new();
    let mut at = Some(root);
    while let Some(link) = at {
        links.push((link.value, link.next.is_some(), link.extra.is_some()));
        at = link.next.as_deref();
    }
    links
}

/// Was a failure: at depths 63, 127, 191, … the lenient field swallowed the page-in's own
/// "depth limit" error, and the missing child it would have mapped to `None` was then loaded
/// from the top and reported.
#[test]
fn a_lenient_field_gives_the_same_result_at_any_depth() {
    const LEN: u32 = 200;
    let mut results = Vec::new();
    for lenient_at in [1, 5, 62, 63, 64, 65, 127, 128, 191] {
        let storage = Arc::new(InMemoryPagableStorage::new());
        let root = soft_chain(&storage, LEN, |depth| depth == lenient_at);
        let back: Soft = page_in(&storage, root)
            .unwrap_or_else(|err| panic!("lenient field at depth {lenient_at}: {err:#}"));
        let links = soft_links(&back);
        assert_eq!(links.len(), LEN as usize, "depth {lenient_at}");
        assert!(
            links.iter().all(|&(_, _, extra)| !extra),
            "the missing extra is None"
        );
        results.push(links);
        drop_deep(back).unwrap();
    }
    assert!(results.windows(2).all(|pair| pair[0] == pair[1]));
}

/// Was a failure: a missing child under a lenient field on every link was reported once the
/// chain passed the recursion bound; and the links above the bound were deserialized twice.
#[test]
fn a_long_chain_with_a_lenient_field_on_every_node() {
    const LEN: u32 = 1_000;
    let storage = Arc::new(InMemoryPagableStorage::new());
    let root = soft_chain(&storage, LEN, |_| true);
    SOFT_CALLS.with(|calls| calls.set(0));
    let back: Soft = page_in(&storage, root).unwrap_or_else(|err| panic!("{err:#}"));
    assert_eq!(
        SOFT_CALLS.with(Cell::get),
        LEN as usize,
        "one deserialization per link"
    );
    let links = soft_links(&back);
    assert_eq!(links.len(), LEN as usize);
    for (at, &(value, next, extra)) in links.iter().enumerate() {
        assert_eq!(value, at as u32);
        assert_eq!(next, at + 1 < LEN as usize);
        assert!(!extra);
    }
    drop_deep(back).unwrap();
}

thread_local! {
    static WIDE_CALLS: Cell<usize> = const { Cell::new(0) };
    static LEAF_CALLS: Cell<usize> = const { Cell::new(0) };
    static DOWN_CALLS: Cell<usize> = const { Cell::new(0) };
}

#[derive(Serialize)]
struct Leaf(u32);

impl<'de> Deserialize<'de> for Leaf {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        LEAF_CALLS.with(|calls| calls.set(calls.get() + 1));
        u32::deserialize(deserializer).map(Leaf)
    }
}

#[derive(Serialize)]
struct Wide {
    kids: Vec<Shared<Leaf>>,
}

impl<'de> Deserialize<'de> for Wide {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        WIDE_CALLS.with(|calls| calls.set(calls.get() + 1));
        Vec::<Shared<Leaf>>::deserialize(deserializer).map(|kids| Wide { kids })
    }
}

#[derive(Serialize)]
struct Down {
    next: Option<Shared<Down>>,
    wide: Option<Shared<Wide>>,
}

impl<'de> Deserialize<'de> for Down {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            next: Option<Shared<Down>>,
            wide: Option<Shared<Wide>>,
        }
        DOWN_CALLS.with(|calls| calls.set(calls.get() + 1));
        Raw::deserialize(deserializer).map(|raw| Down {
            next: raw.next,
            wide: raw.wide,
        })
    }
}

/// Was ~300× slower at depths 63, 127, 191, …: each of the node's children was deferred in
/// turn, and the node and its ancestors were deserialized again for every one.
#[test]
fn a_wide_node_deep_down_deserializes_each_node_once() {
    const KIDS: u32 = 20_000;
    for depth in [5u32, 63, 191, 200] {
        let storage = Arc::new(InMemoryPagableStorage::new());
        let wide = Shared::new(Wide {
            kids: (0..KIDS).map(|i| Shared::new(Leaf(i))).collect(),
        });
        let mut top = Down {
            next: None,
            wide: Some(wide),
        };
        for _ in 0..depth - 1 {
            top = Down {
                next: Some(Shared::new(top)),
                wide: None,
            };
        }
        let key = page_out(&storage, &top).unwrap();
        drop_deep(top).unwrap();
        for calls in [&WIDE_CALLS, &LEAF_CALLS, &DOWN_CALLS] {
            calls.with(|calls| calls.set(0));
        }
        let back: Down = page_in(&storage, key).unwrap();
        assert_eq!(DOWN_CALLS.with(Cell::get), depth as usize, "depth {depth}");
        assert_eq!(WIDE_CALLS.with(Cell::get), 1, "depth {depth}");
        assert_eq!(LEAF_CALLS.with(Cell::get), KIDS as usize, "depth {depth}");
        let mut at = &back;
        for _ in 0..depth - 1 {
            at = at.next.as_ref().unwrap();
        }
        let kids = &at.wide.as_ref().unwrap().kids;
        assert!(kids.iter().enumerate().all(|(i, leaf)| leaf.0 == i as u32));
        drop_deep(back).unwrap();
    }
}

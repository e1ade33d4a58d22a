//! Graph layer: deep graphs page out, in and drop without overflowing the stack.

use std::sync::Arc;

use pagestore::{InMemoryPagableStorage, PagableStorage, Shared, drop_deep, page_in, page_out};
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
fn a_lenient_deserializer_cannot_swallow_the_depth_limit() {
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
    assert_eq!(length, 1_000, "no link was dropped at the recursion bound");
}

//! The prompt queue: a binary heap with the exact sift rules of Python's `heapq`, so
//! `GET /queue` lists pending items in the order ComfyUI would.

use std::cmp::Ordering;

use serde_json::{Map, Value, json};

/// A queue item: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
#[derive(Debug, Clone)]
pub(crate) struct QueueItem {
    /// An int (server counter, negated for `front`) or a float (client-given `number`).
    pub number: Value,
    pub prompt_id: String,
    pub prompt: Map<String, Value>,
    pub extra_data: Map<String, Value>,
    pub outputs: Vec<String>,
}

impl QueueItem {
    /// The JSON list ComfyUI shows in `/queue` and history.
    pub(crate) fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    pub(crate) fn client_id(&self) -> Option<String> {
        self.extra_data
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn lt(&self, other: &Self) -> bool {
        let a = self.number.as_f64().unwrap_or(0.0);
        let b = other.number.as_f64().unwrap_or(0.0);
        match a.partial_cmp(&b) {
            Some(Ordering::Less) => true,
            Some(Ordering::Greater) => false,
            _ => self.prompt_id < other.prompt_id,
        }
    }
}

/// Python `heapq` over queue items.
#[derive(Debug, Default)]
pub(crate) struct Heap {
    items: Vec<QueueItem>,
}

impl Heap {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn items(&self) -> &[QueueItem] {
        &self.items
    }

    pub(crate) fn push(&mut self, item: QueueItem) {
        self.items.push(item);
        let last = self.items.len() - 1;
        self.sift_down(0, last);
    }

    pub(crate) fn pop(&mut self) -> Option<QueueItem> {
        let last = self.items.pop()?;
        if self.items.is_empty() {
            return Some(last);
        }
        let top = std::mem::replace(&mut self.items[0], last);
        self.sift_up(0);
        Some(top)
    }

    /// Removes the first item (in heap order) with that id, then re-heapifies.
    pub(crate) fn remove(&mut self, prompt_id: &str) -> bool {
        let Some(pos) = self.items.iter().position(|i| i.prompt_id == prompt_id) else {
            return false;
        };
        self.items.remove(pos);
        for i in (0..self.items.len() / 2).rev() {
            self.sift_up(i);
        }
        true
    }

    pub(crate) fn clear(&mut self) {
        self.items.clear();
    }

    fn sift_down(&mut self, start: usize, mut pos: usize) {
        while pos > start {
            let parent = (pos - 1) >> 1;
            if self.items[pos].lt(&self.items[parent]) {
                self.items.swap(pos, parent);
                pos = parent;
                continue;
            }
            break;
        }
    }

    fn sift_up(&mut self, mut pos: usize) {
        let end = self.items.len();
        let start = pos;
        let mut child = 2 * pos + 1;
        while child < end {
            let right = child + 1;
            if right < end && !self.items[child].lt(&self.items[right]) {
                child = right;
            }
            self.items.swap(pos, child);
            pos = child;
            child = 2 * pos + 1;
        }
        self.sift_down(start, pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(number: Value, id: &str) -> QueueItem {
        QueueItem {
            number,
            prompt_id: id.into(),
            prompt: Map::new(),
            extra_data: Map::new(),
            outputs: vec![],
        }
    }

    #[test]
    fn matches_the_recorded_queue_probe() {
        let mut h = Heap::default();
        h.push(item(json!(24), "plain_a"));
        h.push(item(json!(-25), "front"));
        h.push(item(json!(-100.0), "m100"));
        h.push(item(json!(1000.0), "n1000"));
        h.push(item(json!(26), "plain_b"));
        h.push(item(json!(27), "custom"));
        let ids: Vec<&str> = h.items().iter().map(|i| i.prompt_id.as_str()).collect();
        assert_eq!(
            ids,
            ["m100", "plain_a", "front", "n1000", "plain_b", "custom"]
        );
        assert!(h.remove("plain_b"));
        let mut order = vec![];
        while let Some(i) = h.pop() {
            order.push(i.prompt_id);
        }
        assert_eq!(order, ["m100", "front", "plain_a", "custom", "n1000"]);
    }
}

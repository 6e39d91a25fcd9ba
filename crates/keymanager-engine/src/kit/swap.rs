//! A value that a re-Configure replaces while calls use it: clients built on rotated
//! credentials, what new keys get. Readers clone an `Arc` under a short lock, never held
//! across a call; calls in flight finish on the value they started with.

use std::sync::{Arc, PoisonError, RwLock};

/// A replaceable shared value.
#[derive(Debug)]
pub struct Swap<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Swap<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the value for every later `get`.
    pub fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_keep_the_old_value_and_later_readers_see_the_new_one() {
        let swap = Swap::new(1);
        let held = swap.get();
        swap.set(2);
        assert_eq!((*held, *swap.get()), (1, 2));
    }
}

//! Proactive rate limits, so the bot stays below Telegram's flood control
//! instead of collecting `429`s: a least spacing per chat, a budget per
//! minute per group, a budget per second per bot. After a `429` the chat
//! waits out the `retry_after` Telegram asked for.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateConfig;

const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);
/// Chat entries idle for longer than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(120);

/// Sending budgets of every bot and chat of this replica.
pub(crate) struct RateLimiter {
    config: RateConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    chats: HashMap<(String, i64), Chat>,
    bots: HashMap<String, VecDeque<Instant>>,
}

struct Chat {
    /// Not before this instant (spacing, or a `retry_after`).
    next: Instant,
    /// Sends of the last minute (groups only).
    recent: VecDeque<Instant>,
    last_used: Instant,
}

impl RateLimiter {
    pub fn new(config: RateConfig) -> Self {
        RateLimiter {
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// Waits until bot `bot` may send one message to `chat`, and counts it.
    pub async fn acquire(&self, bot: &str, chat: i64) {
        loop {
            let wait = self.try_acquire(bot, chat, Instant::now());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// After Telegram answered `429`: nothing more to `chat` before
    /// `retry_after` has passed.
    pub fn penalize(&self, bot: &str, chat: i64, retry_after: Duration) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("rate limiter lock");
        let entry = state.chats.entry((bot.to_owned(), chat)).or_insert(Chat {
            next: now,
            recent: VecDeque::new(),
            last_used: now,
        });
        entry.next = entry.next.max(now + retry_after);
    }

    /// Zero when the send may go now (and is counted), else how long to
    /// wait before asking again.
    fn try_acquire(&self, bot: &str, chat: i64, now: Instant) -> Duration {
        let c = &self.config;
        let mut state = self.state.lock().expect("rate limiter lock");
        if state.chats.len() > 10_000 {
            state
                .chats
                .retain(|_, chat| now.duration_since(chat.last_used) < FORGET_AFTER);
        }
        let is_group = chat < 0;
        let mut wait = Duration::ZERO;
        if let Some(entry) = state.chats.get_mut(&(bot.to_owned(), chat)) {
            while entry
                .recent
                .front()
                .is_some_and(|&t| now.duration_since(t) >= MINUTE)
            {
                entry.recent.pop_front();
            }
            wait = wait.max(entry.next.saturating_duration_since(now));
            if is_group
                && c.per_group_per_minute > 0
                && entry.recent.len() >= c.per_group_per_minute as usize
                && let Some(&oldest) = entry.recent.front()
            {
                wait = wait.max((oldest + MINUTE).saturating_duration_since(now));
            }
        }
        let sent = state.bots.entry(bot.to_owned()).or_default();
        while sent
            .front()
            .is_some_and(|&t| now.duration_since(t) >= SECOND)
        {
            sent.pop_front();
        }
        if c.per_bot_per_second > 0
            && sent.len() >= c.per_bot_per_second as usize
            && let Some(&oldest) = sent.front()
        {
            wait = wait.max((oldest + SECOND).saturating_duration_since(now));
        }
        if !wait.is_zero() {
            return wait;
        }
        sent.push_back(now);
        let entry = state.chats.entry((bot.to_owned(), chat)).or_insert(Chat {
            next: now,
            recent: VecDeque::new(),
            last_used: now,
        });
        entry.next = now + c.per_chat;
        entry.last_used = now;
        if is_group {
            entry.recent.push_back(now);
        }
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_chat_ms: u64, group: u32, bot: u32) -> RateLimiter {
        RateLimiter::new(RateConfig {
            per_chat: Duration::from_millis(per_chat_ms),
            per_group_per_minute: group,
            per_bot_per_second: bot,
        })
    }

    #[test]
    fn spaces_messages_per_chat_but_not_across_chats() {
        let l = limiter(1000, 0, 0);
        let t = Instant::now();
        assert!(l.try_acquire("b", 1, t).is_zero());
        assert_eq!(l.try_acquire("b", 1, t), Duration::from_secs(1));
        assert!(l.try_acquire("b", 2, t).is_zero());
        assert!(l.try_acquire("b", 1, t + Duration::from_secs(1)).is_zero());
    }

    #[test]
    fn groups_have_a_budget_per_minute() {
        let l = limiter(0, 2, 0);
        let t = Instant::now();
        assert!(l.try_acquire("b", -5, t).is_zero());
        assert!(l.try_acquire("b", -5, t).is_zero());
        assert_eq!(
            l.try_acquire("b", -5, t + Duration::from_secs(10)),
            Duration::from_secs(50)
        );
        assert!(
            l.try_acquire("b", 5, t).is_zero(),
            "private chats are not groups"
        );
        assert!(l.try_acquire("b", -5, t + MINUTE).is_zero());
    }

    #[test]
    fn bots_have_a_budget_per_second_and_retry_after_blocks_a_chat() {
        let l = limiter(0, 0, 2);
        let t = Instant::now();
        assert!(l.try_acquire("b", 1, t).is_zero());
        assert!(l.try_acquire("b", 2, t).is_zero());
        assert_eq!(l.try_acquire("b", 3, t), SECOND);
        assert!(l.try_acquire("other", 3, t).is_zero());
        l.penalize("other", 3, Duration::from_secs(7));
        assert!(l.try_acquire("other", 3, Instant::now()) > Duration::from_secs(6));
    }
}

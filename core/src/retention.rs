//! Retention: which sets to keep and which to forget, restic-style. Pure:
//! the caller deletes.
//!
//! Sets are grouped by origin (agent and sources); within a group, newest
//! first: `keep_last` keeps the N newest; `keep_daily`/`weekly`/`monthly`
//! keep the newest set of each of the N most recent days / ISO weeks /
//! months (UTC) that have a set. A set kept by any rule is kept.

use crate::model::{SetId, SetRecord};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// How many of what to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Policy {
    /// Keep the N newest sets.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub keep_last: u32,
    /// Keep the newest set of each of the N most recent days.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub keep_daily: u32,
    /// Keep the newest set of each of the N most recent weeks.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub keep_weekly: u32,
    /// Keep the newest set of each of the N most recent months.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub keep_monthly: u32,
}

impl Policy {
    /// True when the policy keeps nothing at all (refused: use a delete).
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
    }
}

/// (year, month, day) of a day number since 1970-01-01 (H. Hinnant's
/// civil-from-days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// (year, month) of a day number since 1970-01-01.
fn year_month(days: i64) -> (i64, u32) {
    let (y, m, _) = civil(days);
    (y, m)
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC), as sets are
/// listed.
pub fn utc(secs: u64) -> String {
    let (y, m, d) = civil(day(secs));
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

fn day(secs: u64) -> i64 {
    i64::try_from(secs / 86_400).unwrap_or(i64::MAX)
}

/// Which of `sets` to keep (the rest are to be forgotten).
pub fn plan(sets: &[SetRecord], policy: &Policy) -> (Vec<SetId>, Vec<SetId>) {
    let mut groups: BTreeMap<(String, Vec<String>), Vec<&SetRecord>> = BTreeMap::new();
    for s in sets {
        let mut sources = s.header.sources.clone();
        sources.sort();
        groups
            .entry((s.header.agent.clone(), sources))
            .or_default()
            .push(s);
    }
    let mut keep: BTreeSet<SetId> = BTreeSet::new();
    for mut g in groups.into_values() {
        g.sort_by(|a, b| (b.committed_at, &b.header.set).cmp(&(a.committed_at, &a.header.set)));
        for s in g
            .iter()
            .take(usize::try_from(policy.keep_last).unwrap_or(usize::MAX))
        {
            keep.insert(s.header.set.clone());
        }
        let mut bucketed = |n: u32, bucket: &dyn Fn(u64) -> i64| {
            let mut seen = BTreeSet::new();
            for s in &g {
                if seen.len() >= usize::try_from(n).unwrap_or(usize::MAX) {
                    break;
                }
                if seen.insert(bucket(s.committed_at)) {
                    keep.insert(s.header.set.clone());
                }
            }
        };
        bucketed(policy.keep_daily, &day);
        // ISO weeks start on Monday; 1970-01-01 was a Thursday.
        bucketed(policy.keep_weekly, &|t| (day(t) + 3).div_euclid(7));
        bucketed(policy.keep_monthly, &|t| {
            let (y, m) = year_month(day(t));
            y * 12 + i64::from(m)
        });
    }
    let (k, f): (Vec<&SetRecord>, Vec<&SetRecord>) =
        sets.iter().partition(|s| keep.contains(&s.header.set));
    (
        k.into_iter().map(|s| s.header.set.clone()).collect(),
        f.into_iter().map(|s| s.header.set.clone()).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use proptest::prelude::*;

    #[test]
    fn times_are_shown_as_utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400 + 3661), "2000-02-29 01:01:01");
        assert_eq!(super::utc(1_795_455_461), "2026-11-23 17:37:41");
        assert_eq!(super::utc(4_102_444_799), "2099-12-31 23:59:59");
    }

    fn set(id: &str, t: u64, agent: &str) -> SetRecord {
        SetRecord {
            header: SetHeader {
                set: SetId::new(id),
                label: String::new(),
                agent: agent.into(),
                sources: vec!["array:v".into()],
                image: ImageId::new("i"),
                frozen_at: t,
                started_at: t,
            },
            items: vec![],
            committed_at: t,
            failures: Vec::new(),
        }
    }

    const DAY: u64 = 86_400;

    #[test]
    fn calendar() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(31), (1970, 2));
        assert_eq!(year_month(day(1_795_305_952)), (2026, 11)); // 2026-11-21
        assert_eq!(year_month(day(951_782_400)), (2000, 2)); // 2000-02-29
    }

    #[test]
    fn keep_last_daily_weekly_monthly() {
        // Two sets a day for 70 days.
        let sets: Vec<SetRecord> = (0..140)
            .map(|i| set(&format!("s{i:03}"), 1_700_000_000 + i * DAY / 2, "h"))
            .collect();
        let (keep, forget) = plan(
            &sets,
            &Policy {
                keep_last: 3,
                ..Policy::default()
            },
        );
        assert_eq!(
            keep,
            vec![SetId::new("s137"), SetId::new("s138"), SetId::new("s139")]
        );
        assert_eq!(forget.len(), 137);
        let (keep, _) = plan(
            &sets,
            &Policy {
                keep_daily: 7,
                ..Policy::default()
            },
        );
        assert_eq!(keep.len(), 7, "one a day");
        let (keep, _) = plan(
            &sets,
            &Policy {
                keep_weekly: 4,
                keep_monthly: 3,
                ..Policy::default()
            },
        );
        assert!(keep.len() >= 4 && keep.len() <= 7, "{keep:?}");
        assert!(
            keep.contains(&SetId::new("s139")),
            "the newest is always the newest of its week"
        );
    }

    #[test]
    fn groups_are_kept_separately() {
        let sets = vec![set("a1", 10, "a"), set("a2", 20, "a"), set("b1", 15, "b")];
        let (keep, forget) = plan(
            &sets,
            &Policy {
                keep_last: 1,
                ..Policy::default()
            },
        );
        assert_eq!(keep, vec![SetId::new("a2"), SetId::new("b1")]);
        assert_eq!(forget, vec![SetId::new("a1")]);
    }

    proptest! {
        /// Every set is kept or forgotten, never both; the newest set of
        /// each group is kept by any non-empty policy.
        #[test]
        fn a_partition_that_keeps_the_newest(
            times in proptest::collection::vec((0u64..400 * DAY, 0u8..2), 1..60),
            last in 0u32..4, daily in 0u32..4, weekly in 0u32..3, monthly in 0u32..3,
        ) {
            let sets: Vec<SetRecord> = times.iter().enumerate().map(|(i, (t, g))| set(&format!("s{i}"), *t, &format!("h{g}"))).collect();
            let policy = Policy { keep_last: last, keep_daily: daily, keep_weekly: weekly, keep_monthly: monthly };
            let (keep, forget) = plan(&sets, &policy);
            prop_assert_eq!(keep.len() + forget.len(), sets.len());
            prop_assert!(keep.iter().all(|k| !forget.contains(k)));
            if !policy.is_empty() {
                for g in ["h0", "h1"] {
                    if let Some(newest) = sets.iter().filter(|s| s.header.agent == g).max_by_key(|s| (s.committed_at, s.header.set.clone())) {
                        prop_assert!(keep.contains(&newest.header.set));
                    }
                }
            }
        }
    }
}

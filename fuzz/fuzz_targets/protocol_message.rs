//! Fuzzes what the replica and the primary parse from a peer before anything else: the request
//! route (method + path) and every JSON message. No input may panic; whatever decodes must
//! re-encode and decode to the same value, and an accepted route must print back to its path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::protocol::{
    decode, BeginCompare, Commit, CompareSession, ErrorBody, FailbackBase, FailbackStatus, HashRange,
    Hello, HelloResponse, LogStatus, PutVm, RangeAnswer, ReplicaVm, Route, StartFailback,
    TestResponse, Validate,
};

fn round_trip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + Validate + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = decode::<T>(data) {
        let text = serde_json::to_vec(&v).expect("encodes");
        assert_eq!(decode::<T>(&text).expect("re-decodes"), v);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 16 {
        0 => round_trip::<Hello>(body),
        1 => round_trip::<HelloResponse>(body),
        2 => round_trip::<PutVm>(body),
        3 => round_trip::<ReplicaVm>(body),
        4 => round_trip::<LogStatus>(body),
        5 => round_trip::<Commit>(body),
        6 => round_trip::<ErrorBody>(body),
        7 => round_trip::<TestResponse>(body),
        8 => round_trip::<BeginCompare>(body),
        9 => round_trip::<CompareSession>(body),
        10 => {
            if let Ok(r) = HashRange::parse(body) {
                assert_eq!(HashRange::parse(&r.encode()).expect("re-parses"), r);
            }
        }
        11 => {
            if let Ok(a) = RangeAnswer::parse(body) {
                assert_eq!(RangeAnswer::parse(&a.encode()).expect("re-parses"), a);
            }
        }
        12 => round_trip::<StartFailback>(body),
        13 => round_trip::<FailbackStatus>(body),
        14 => {
            if let Ok(b) = FailbackBase::parse(body) {
                assert_eq!(FailbackBase::parse(&b.encode()).expect("re-parses"), b);
            }
            // A streamed base: its head as soon as it arrived, the same as the whole body's.
            if let Ok(Some((head, len))) = FailbackBase::parse_head(body) {
                let whole = FailbackBase::parse(body).expect("a whole head parses");
                assert_eq!((head.disk, head.candidates), (whole.disk, whole.candidates));
                assert_eq!(&body[len..], whole.map.as_slice());
            }
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let (method, path) = text.split_once(' ').unwrap_or(("GET", &text));
            if let Ok(route) = Route::parse(method, path) {
                let again = Route::parse(route.method(), &route.path()).expect("own path parses");
                assert_eq!(again, route);
            }
        }
    }
});

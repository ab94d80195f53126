//! When a certificate stops being valid, read from its DER (just enough of
//! X.509 to reach `validity`), so `diagnose` can warn before it expires. Pure.

/// `(not_before, not_after)` as seconds since the epoch.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (certificate, _) = tlv(der, 0x30)?;
    let (mut tbs, _) = tlv(certificate, 0x30)?;
    // [0] EXPLICIT version is optional.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs, 0xa0)?.1;
    }
    let (_serial, rest) = tlv(tbs, 0x02)?;
    let (_signature, rest) = tlv(rest, 0x30)?;
    let (_issuer, rest) = tlv(rest, 0x30)?;
    let (validity, _) = tlv(rest, 0x30)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some((not_before, not_after))
}

/// One DER element with the expected tag: its contents and what follows.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)? as usize;
    let (length, header) = if first < 0x80 {
        (first, 2)
    } else {
        let count = first & 0x7f;
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(2..2 + count)?;
        (bytes.iter().fold(0usize, |n, b| (n << 8) | *b as usize), 2 + count)
    };
    let contents = input.get(header..header.checked_add(length)?)?;
    Some((contents, &input[header + length..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(input: &[u8]) -> Option<(i64, &[u8])> {
    let tag = *input.first()?;
    let (text, rest) = tlv(input, tag)?;
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, text) = match tag {
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 => (text.get(..4)?.parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |at: usize| -> Option<i64> { text.get(at..at + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second, rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's method).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 3), 20_790);
    }

    #[test]
    fn reads_the_validity_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["x".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2024, 1, 2);
        params.not_after = rcgen::date_time_ymd(2051, 6, 7);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let (from, to) = validity(cert.der()).expect("validity");
        assert_eq!(from, days_from_civil(2024, 1, 2) * 86_400);
        assert_eq!(to, days_from_civil(2051, 6, 7) * 86_400);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(validity(b""), None);
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(validity(&[0x30, 0x03, 0x02, 0x01, 0x00]), None);
    }
}

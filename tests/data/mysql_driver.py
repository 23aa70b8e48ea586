"""Runs statements through a Python MySQL driver and prints one JSON line
per statement: its rows (every value as text, NULL as null), or its error.
Two steps are not SQL: "-- wait-for PATH" waits until PATH exists, and
"-- change-user USER PASSWORD DB" sends COM_CHANGE_USER (connector only).

    python3 mysql_driver.py connector|pymysql PORT SQL...

connector: mysql-connector-python with server-side prepared statements
(binary rows). pymysql: PyMySQL with CLIENT_MULTI_STATEMENTS, every result
of a text of several statements.
"""

import json
import sys


def text(value):
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


def main():
    driver, port, *statements = sys.argv[1:]
    args = dict(host="127.0.0.1", port=int(port), user="app", password="secret", database="shop")
    if driver == "connector":
        import mysql.connector

        conn = mysql.connector.connect(ssl_disabled=True, use_pure=True, **args)
        cursor = conn.cursor(prepared=True)
    elif driver == "pymysql":
        import pymysql
        from pymysql.constants import CLIENT

        conn = pymysql.connect(client_flag=CLIENT.MULTI_STATEMENTS, **args)
        cursor = conn.cursor()
    else:
        raise SystemExit(f"unknown driver {driver}")
    for sql in statements:
        try:
            if sql.startswith("-- wait-for "):
                # Waits (up to 30 s) until a file exists; the cursor and its
                # prepared statement are left as they are.
                import os, time
                path = sql.split(maxsplit=2)[2]
                deadline = time.time() + 30
                while not os.path.exists(path) and time.time() < deadline:
                    time.sleep(0.05)
                print(json.dumps({"sql": sql, "results": []}), flush=True)
                continue
            if sql.startswith("-- change-user "):
                # COM_CHANGE_USER (mysql-connector-python): "-- change-user USER PASSWORD DB"
                user, password, database = sql.split()[2:5]
                conn.cmd_change_user(username=user, password=password, database=database)
                cursor = conn.cursor(prepared=True)
                print(json.dumps({"sql": sql, "results": []}), flush=True)
                continue
            cursor.execute(sql)
            results = []
            while True:
                rows = cursor.fetchall() if cursor.description else []
                results.append([[text(v) for v in row] for row in rows])
                if driver != "pymysql" or not cursor.nextset():
                    break
            print(json.dumps({"sql": sql, "results": results}), flush=True)
        except Exception as e:  # the error is the result
            print(json.dumps({"sql": sql, "error": str(e)}), flush=True)


main()
